"""`up`, `down` and `status` of the local stack."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mergeflow.settings import Settings
from mergeflow.stack.processes import (
    StackError,
    exit_code,
    is_running,
    log_tail,
    port_is_free,
    read_pid,
    start_detached,
    stop_group,
    write_private,
)
from mergeflow.stack.services import SERVICE_NAMES, SERVICE_TYPES, Service, stack_dir

DEFAULT_TIMEOUT = 120.0  # first starts migrate MLflow's and Prefect's databases: tens of seconds
DEFAULT_GRACE = 10.0
POLL_SECONDS = 0.25

Report = Callable[[str], None]


def _silent(_: str) -> None:
    """The default progress reporter: library calls print nothing."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    title: str
    running: bool
    port: int
    url: str
    pid: int | None = None
    healthy: bool | None = None  # None when stopped
    detail: str = ""  # why it is unhealthy, or how it came up
    seconds: float | None = None  # start-up time, when this `up` started it


@dataclass(frozen=True)
class _Running:
    pid: int
    port: int


def select(names: Iterable[str] | None, with_needs: bool = False) -> list[type[Service]]:
    """Service types for `names` (default: all), optionally with the services they need, in
    start order."""
    wanted = set(SERVICE_NAMES if names is None else names)
    unknown = wanted - set(SERVICE_NAMES)
    if unknown:
        raise StackError(
            f"unknown service(s) {', '.join(sorted(unknown))}; services: {', '.join(SERVICE_NAMES)}"
        )
    if with_needs:
        for name in list(wanted):
            wanted.update(SERVICE_TYPES[name].needs)
    return [SERVICE_TYPES[name] for name in SERVICE_NAMES if name in wanted]


def env_file(settings: Settings) -> Path:
    return stack_dir(settings) / "env.sh"


def _inspect(service: Service) -> _Running | None:
    """The service's server if it is running; a stale pid file (process gone) is removed."""
    pid = read_pid(service.pid_file)
    if pid is None or not is_running(pid, service.marker):
        _forget(service)
        return None
    try:
        port = int(json.loads(service.run_file.read_text())["port"])
    except (OSError, ValueError, KeyError):
        port = service.port
    return _Running(pid, port)


def _forget(service: Service) -> None:
    service.pid_file.unlink(missing_ok=True)
    service.run_file.unlink(missing_ok=True)


def _start(service: Service) -> int:
    try:
        command, env = service.launch()
        pid = start_detached(command, env, service.folder, service.log_file)
    except OSError as exc:
        raise StackError(f"could not start {service.title} in {service.folder}: {exc}") from exc
    service.pid_file.write_text(f"{pid}\n")
    service.run_file.write_text(json.dumps({"pid": pid, "port": service.port, "started": time.time()}))
    return pid


def _check_ports(services: list[Service], running: dict[str, _Running | None]) -> None:
    """Refuse to start anything when a port is taken, before any server is started."""
    ports: dict[int, Service] = {}
    for service in services:
        other = ports.setdefault(service.port, service)
        if other is not service:
            raise StackError(
                f"{other.title} and {service.title} are both set to port {service.port}; "
                f"change one with {service.port_hint}"
            )
    for service in services:
        current = running[service.name]
        if current is not None and current.port != service.port:
            raise StackError(
                f"{service.title} is already running on port {current.port}, not {service.port}: "
                "run `mergeflow stack down` first to change its port"
            )
        if current is None and not port_is_free(service.port):
            raise StackError(
                f"port {service.port} on 127.0.0.1, wanted for {service.title}, is in use by another "
                f"program; choose another port with {service.port_hint}"
            )


def up(
    settings: Settings,
    names: Iterable[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    report: Report = _silent,
) -> list[ServiceStatus]:
    """Start the services (default: all) that are not running, and wait until all are healthy.

    Idempotent: running services are only checked. If a service fails to become healthy within
    `timeout` seconds, the servers this call started are stopped again and StackError tells
    which service failed, with the tail of its log.
    """
    services = [cls(settings) for cls in select(names, with_needs=True)]
    stack_dir(settings).mkdir(mode=0o700, parents=True, exist_ok=True)
    running = {service.name: _inspect(service) for service in services}
    _check_ports(services, running)

    started: dict[str, int] = {}
    try:
        for service in services:
            if running[service.name] is None:
                started[service.name] = _start(service)
                url = service.url(service.port)
                report(f"starting {service.title} on {url} (pid {started[service.name]}) ...")
        results = _wait_healthy(services, running, started, timeout, report)
    except BaseException:
        for name, pid in started.items():
            try:
                stop_group(pid, grace=2.0)
            except StackError:
                continue  # keep its pid file for `down`; the original error is the one to report
            _forget(SERVICE_TYPES[name](settings))
        raise
    write_env_file(settings)
    return results


def _wait_healthy(
    services: list[Service],
    running: dict[str, _Running | None],
    started: dict[str, int],
    timeout: float,
    report: Report,
) -> list[ServiceStatus]:
    """Probe every service until healthy, all at once, so each start-up time is its own."""
    t0 = time.monotonic()
    pending: dict[str, tuple[Service, int, int, Callable[[], None]]] = {}
    for service in services:
        current = running[service.name]
        pid, port = (current.pid, current.port) if current else (started[service.name], service.port)
        pending[service.name] = (service, pid, port, service.probe(port, starting=True))
    results: dict[str, ServiceStatus] = {}
    last: dict[str, str] = {}
    while pending:
        for name, (service, pid, port, probe) in list(pending.items()):
            code = exit_code(pid)
            if code is not None:
                raise StackError(
                    f"{service.title} exited with code {code} during start-up; log {service.log_file}:\n"
                    f"{log_tail(service.log_file)}"
                )
            try:
                probe()
            except Exception as exc:  # any failure means "not healthy yet"
                last[name] = f"{type(exc).__name__}: {exc}"
                if time.monotonic() - t0 > timeout:
                    raise StackError(
                        f"{service.title} not healthy at {service.url(port)} after {timeout:g}s "
                        f"(last check: {last[name]}); log {service.log_file}:\n{log_tail(service.log_file)}"
                    ) from None
                continue
            del pending[name]
            seconds = time.monotonic() - t0
            fresh = name in started
            detail = f"started in {seconds:.1f}s" if fresh else "already running"
            report(f"{service.title} {detail} at {service.url(port)} (pid {pid})")
            results[name] = ServiceStatus(
                name,
                service.title,
                True,
                port,
                service.url(port),
                pid,
                True,
                detail,
                seconds if fresh else None,
            )
        if pending:
            time.sleep(POLL_SECONDS)
    return [results[service.name] for service in services]


def down(
    settings: Settings,
    names: Iterable[str] | None = None,
    grace: float = DEFAULT_GRACE,
    report: Report = _silent,
) -> list[ServiceStatus]:
    """Stop the services (default: all): SIGTERM each process group, SIGKILL after `grace` seconds.

    Stale pid files are removed. Services stop in reverse start order (Prefect, MLflow, S3), so
    nothing loses its storage while still running.
    """
    results = []
    for cls in reversed(select(names)):
        service = cls(settings)
        had_pid_file = service.pid_file.exists()
        current = _inspect(service)
        if current is None:
            note = " (removed a stale pid file)" if had_pid_file else ""
            report(f"{service.title} was not running{note}")
        else:
            t0 = time.monotonic()
            stop_group(current.pid, grace)
            _forget(service)
            report(f"{service.title} stopped (pid {current.pid}) in {time.monotonic() - t0:.1f}s")
        results.append(_stopped(service))
    write_env_file(settings)
    return results[::-1]


def _stopped(service: Service) -> ServiceStatus:
    return ServiceStatus(service.name, service.title, False, service.port, service.url(service.port))


def status(settings: Settings, names: Iterable[str] | None = None) -> list[ServiceStatus]:
    """Each service: running or stopped, pid, URL, and for running ones one health check now."""
    results = []
    for cls in select(names):
        service = cls(settings)
        current = _inspect(service)
        if current is None:
            results.append(_stopped(service))
            continue
        try:
            service.probe(current.port)()
            healthy, detail = True, ""
        except Exception as exc:  # report, don't raise: status must work on a broken stack
            healthy, detail = False, f"{type(exc).__name__}: {exc}"
        url = service.url(current.port)
        results.append(
            ServiceStatus(service.name, service.title, True, current.port, url, current.pid, healthy, detail)
        )
    return results


def env_lines(settings: Settings) -> list[str]:
    """`export` lines for the running services. Keys are read from their files by the shell,
    never written out."""
    lines = []
    for name in SERVICE_NAMES:
        service = SERVICE_TYPES[name](settings)
        current = _inspect(service)
        if current is not None:
            lines += [f"export {var}={value}" for var, value in service.exports(current.port).items()]
    return lines


def write_env_file(settings: Settings) -> Path | None:
    """Write `<home>/stack/env.sh` for the running services (removed when none runs)."""
    path = env_file(settings)
    lines = env_lines(settings)
    if not lines:
        path.unlink(missing_ok=True)
        return None
    header = "# mergeflow stack: `source` this file to use the running services.\n"
    write_private(path, header + "\n".join(lines) + "\n")
    return path
