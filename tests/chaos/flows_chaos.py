"""Workflows and tasks for the chaos and bad-input suites, built per cluster by ``build()``.

Worker subprocesses import ``tests.chaos.chaos_app``, which calls ``build`` with the URLs and
recovery knobs from the environment; the test process calls ``build`` with the same values.
Task names start with ``c.`` so they never collide with ``tests/fixtures/flows.py``.

Counters (how many times a task body ran) live in a Redis db that is *not* the broker, so a
broker wiped by the broker-loss test keeps them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery

from sdk import (
    ActivityError,
    Baton,
    Cancelled,
    RetryPolicy,
    SerializationError,
    first,
    gather,
    sleep,
    step,
    wait_signal,
)


class NS:
    """A bag of the built objects, by name."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def build(broker_url: str, database_url: str, queue: str = "celery", counter_url: str | None = None,
          omit: Iterable[str] = (), **baton_kw: Any) -> NS:
    """Build the app, its Baton, tasks and workflows; ``omit`` leaves workflows unregistered."""
    app = Celery("baton_chaos", broker=broker_url, set_as_current=False)
    app.conf.task_default_queue = queue
    app.conf.broker_transport_options = {"visibility_timeout": 3600}
    app.conf.broker_connection_retry = True
    app.conf.broker_connection_max_retries = None
    baton = Baton(app, database_url=database_url, **baton_kw)
    counter = redis.Redis.from_url(counter_url or os.environ.get("BATON_TEST_COUNTER_URL") or broker_url)
    skip = set(omit)

    def bump(key: str) -> int:
        return int(counter.incr(f"chaos:{key}"))

    def workflow(fn: Any = None, **kw: Any) -> Any:
        """``baton.workflow`` unless the name is omitted (a worker that lacks the code)."""
        def reg(f: Any) -> Any:
            if (kw.get("name") or f.__name__) in skip:
                return f
            return baton.workflow(f, **kw)
        return reg(fn) if fn is not None else reg

    # ------------------------------------------------------------ tasks
    @app.task(name="c.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="c.echo")
    def echo(value: Any) -> Any:
        return value

    @app.task(name="c.sleepy")
    def sleepy(seconds: float, value: Any = None, key: str = "") -> Any:
        if key:
            bump(key)
        time.sleep(seconds)
        return value

    @app.task(name="c.hang_once")
    def hang_once(key: str, seconds: float) -> str:
        """The first call hangs for ``seconds`` (then returns "late"); later calls return "fresh"."""
        if bump(key) == 1:
            time.sleep(seconds)
            bump(f"{key}:late-returned")
            return "late"
        return "fresh"

    @app.task(name="c.whence", bind=True)
    def whence(self: Any, seconds: float = 0.0, key: str = "") -> list[Any]:
        """Where it ran: [its task id, the message it rode on if eager, its process id, its start]."""
        began = time.time()
        if key:
            bump(key)
        time.sleep(seconds)
        return [self.request.id, self.request.get("baton_carrier"), os.getpid(), began]

    @app.task(name="c.celery_retry", bind=True)
    def celery_retry(self: Any, key: str) -> list[Any]:
        """Asks Celery for a retry on its first run (``self.retry``: a new message, same id)."""
        if bump(key) == 1:
            raise self.retry(countdown=0)
        return [self.request.id, self.request.get("baton_carrier"), self.request.retries]

    @app.task(name="c.big")
    def big(n: int) -> str:
        return "x" * n

    @app.task(name="c.unserialisable")
    def unserialisable() -> Any:
        return {"when": object()}

    @app.task(name="c.surrogate")
    def surrogate() -> Any:
        return {"listing": b"caf\xe9.txt".decode("utf-8", "surrogateescape")}  # a lone surrogate

    @app.task(name="c.cyclic")
    def cyclic() -> Any:
        tree: dict[str, Any] = {"name": "root"}
        tree["parent"] = tree
        return tree

    # ------------------------------------------------------------ the churn mix
    @workflow
    def seq(n: int, start: int = 0):  # type: ignore[no-untyped-def]
        total = start
        for _ in range(n):
            total = yield add.s(total, 1)
        return total

    @workflow
    def fan(n: int):  # type: ignore[no-untyped-def]
        values = yield [sleepy.s(0.05, i) for i in range(n)]
        return sum(values)

    @workflow
    def timed(seconds: float, v: int):  # type: ignore[no-untyped-def]
        yield sleep(seconds)
        r = yield add.s(v, 1)
        return r

    @workflow
    def signalled(v: int):  # type: ignore[no-untyped-def]
        s = yield wait_signal("go")
        r = yield add.s(v, s)
        return r

    @workflow
    def mixed(i: int):  # type: ignore[no-untyped-def]
        a = yield add.s(i, 1)
        b = yield [sleepy.s(0.2, a), add.s(a, 1), echo.s(2)]
        yield sleep(0.3)
        s = yield wait_signal("go")
        c = yield add.s(sum(b), s)
        return c

    @workflow
    def family(n: int):  # type: ignore[no-untyped-def]
        xs = yield [seq.s(2, i) for i in range(n)]
        return sum(xs)

    # ------------------------------------------------------------ slow shapes for crash tests
    @workflow
    def slow_seq(n: int, seconds: float, key: str):  # type: ignore[no-untyped-def]
        done = []
        for i in range(n):
            v = yield sleepy.s(seconds, i, key)
            done.append(v)
        return done

    @workflow
    def slow_fan(n: int, seconds: float, key: str):  # type: ignore[no-untyped-def]
        vals = yield [sleepy.s(seconds, i, key) for i in range(n)]
        return sum(vals)

    @workflow
    def hung(key: str, seconds: float, timeout: float, queue: str | None = None):  # type: ignore[no-untyped-def]
        sig = hang_once.s(key, seconds)
        out = yield step(sig.set(queue=queue) if queue else sig,
                         retry=RetryPolicy(max_attempts=3, initial_interval=0.1), timeout=timeout)
        return out

    @workflow
    def stuck(seconds: float, key: str, queue: str | None = None):  # type: ignore[no-untyped-def]
        sig = sleepy.s(seconds, "slept", key)
        out = yield (sig.set(queue=queue) if queue else sig)
        return out

    @workflow
    def trail(n: int, slow_at: int = -1, seconds: float = 0.0, key: str = "",
              queue_at: int = -1, queue: str | None = None, timeout_at: int = -1):  # type: ignore[no-untyped-def]
        """``n`` steps of ``whence``: one slow (and counted), one routed to ``queue``, one with a timeout."""
        out = []
        for i in range(n):
            sig = whence.s(seconds, key) if i == slow_at else whence.s()
            if i == queue_at:
                sig = sig.set(queue=queue)
            got = yield (step(sig, timeout=30.0) if i == timeout_at else sig)
            out.append(got)
        return out

    @workflow
    def spread(n: int, slow_at: int = -1, seconds: float = 0.0, key: str = "",  # type: ignore[no-untyped-def]
               each: float = 0.0, each_from: int = 0):
        """One fan-out of ``n`` ``whence``: one slow (and counted), those from ``each_from`` on
        ``each`` s long; then one more step."""
        got = yield [whence.s(seconds, key) if i == slow_at else whence.s(each if i >= each_from else 0.0)
                     for i in range(n)]
        after = yield whence.s()
        return [*got, after]

    @workflow
    def retried(key: str):  # type: ignore[no-untyped-def]
        first = yield whence.s()
        again = yield celery_retry.s(key)
        last = yield whence.s()
        return [first, again, last]

    # ------------------------------------------------------------ bad input that reaches a worker
    @workflow
    def ghost():  # type: ignore[no-untyped-def]
        out = yield app.signature("c.no_such_task", args=(1,))
        return out

    @workflow
    def bad_yield_args():  # type: ignore[no-untyped-def]
        try:
            yield add.s({"when": object()}, 1)
        except TypeError as exc:  # SerializationError is a TypeError, thrown at the yield
            return {"caught": type(exc).__name__, "message": str(exc)}
        return "unreachable"

    @workflow
    def big_yield_args(n: int):  # type: ignore[no-untyped-def]
        try:
            yield echo.s("x" * n)
        except TypeError as exc:
            return {"caught": type(exc).__name__, "message": str(exc)}
        return "unreachable"

    @workflow
    def bad_result(task: str = "c.unserialisable"):  # type: ignore[no-untyped-def]
        """A task whose result is refused at the source: the run catches the failure."""
        try:
            yield app.signature(task)
        except ActivityError as err:
            return {"caught": err.error_type, "message": err.message}
        return "unreachable"

    @workflow
    def cyclic_values():  # type: ignore[no-untyped-def]
        """A result and an argument that contain themselves: refused, and the run goes on."""
        caught = []
        try:
            yield cyclic.s()
        except ActivityError as err:
            caught.append([err.error_type, err.message])
        loop: list[Any] = []
        loop.append(loop)
        try:
            yield add.s(loop, 1)
        except SerializationError as err:
            caught.append(["SerializationError", str(err)])
        total = yield add.s(1, 1)
        return {"caught": caught, "total": total}

    @workflow
    def big_result(n: int):  # type: ignore[no-untyped-def]
        try:
            yield big.s(n)
        except ActivityError as err:
            return {"caught": err.error_type, "message": err.message}
        return "unreachable"

    @workflow
    def yields_int():  # type: ignore[no-untyped-def]
        yield 42

    @workflow
    def yields_empty():  # type: ignore[no-untyped-def]
        yield []

    @workflow
    def empty_gather():  # type: ignore[no-untyped-def]
        yield gather()

    @workflow
    def empty_first():  # type: ignore[no-untyped-def]
        yield first()

    @workflow
    def negative_sleep():  # type: ignore[no-untyped-def]
        yield sleep(-5)

    @workflow
    def never_yields(v: int):  # type: ignore[no-untyped-def]
        if v < 0:
            yield sleep(1)
        return v * 2

    @workflow
    def returns_object():  # type: ignore[no-untyped-def]
        yield add.s(1, 1)
        return object()

    @workflow
    def swallows_and_returns():  # type: ignore[no-untyped-def]
        try:
            yield wait_signal("never")
        except BaseException:
            return "swallowed"
        return "unreachable"

    @workflow
    def catches_exception():  # type: ignore[no-untyped-def]
        try:
            yield wait_signal("never")
        except Exception:  # must NOT catch Cancelled (a BaseException)
            return "caught"
        return "unreachable"

    @workflow
    def swallows_forever(key: str):  # type: ignore[no-untyped-def]
        while True:
            try:
                yield wait_signal("never")
            except Cancelled:  # swallowed: the loop goes on waiting
                yield echo.s(key)

    @workflow(redact=["api_key"])
    def redacted(secret_suffix: str):  # type: ignore[no-untyped-def]
        api_key = "sk-live-" + secret_suffix[::-1]
        public = "visible-value"
        n = yield add.s(len(api_key), 0)
        return {"n": n, "public": public}

    return NS(app=app, baton=baton, **{k: v for k, v in locals().items() if k not in ("app", "baton")})
