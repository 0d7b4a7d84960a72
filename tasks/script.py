"""The script task: one plan action script, on the orchestrator (subprocess, argv list, no shell) or
on a named host over SSH, with its arguments rendered in the jinja2 sandbox.

Output goes to the run log and, trimmed, to the report. A non-zero exit or a timeout raises ScriptError
(not retried: a script is not a transient fabric failure).
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from siterecovery.errors import ScriptError, SiteRecoveryError
from siterecovery.intent import StepJournal
from siterecovery.model import Host, ScriptAction
from siterecovery.model.common import Frozen
from siterecovery.render import PlanTemplateError, render_args
from siterecovery.report import ScriptRecord

from .fabric import resolve_secret
from .remote import run_remote

# What the report keeps of a script's output; the run log gets up to LOG_CHARS.
REPORT_CHARS = 4000
LOG_CHARS = 64_000


class ScriptJob(Frozen):
    id: str
    label: str
    action: ScriptAction
    plan_dir: str
    context: dict[str, Any]
    host: Host | None = None
    dry_run: bool = False
    state_dir: str
    plan: str
    intent: str

    @property
    def cache_key(self) -> str:
        return f"{self.plan}:{self.intent}:{self.id}"

    def env(self) -> dict[str, str]:
        ctx = self.context
        env = {"SITERECOVERY_PLAN": str(ctx["plan"]["name"]), "SITERECOVERY_GROUP": str(ctx["group"]["name"]),
               "SITERECOVERY_FAILOVER_TYPE": str(ctx["failover_type"]), "SITERECOVERY_DIRECTION": str(ctx["direction"]),
               "SITERECOVERY_DRY_RUN": "1" if self.dry_run else "0"}
        if ctx.get("vm"):
            env["SITERECOVERY_VM"] = str(ctx["vm"]["name"])
        env.update(self.action.env)
        return env


def script_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return str(parameters["job"].cache_key)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


@task(name="script", task_run_name="{label}")
def run_script(label: str, job: ScriptJob, flow_run: str | None = None) -> dict[str, Any]:
    log = get_run_logger()
    journal = StepJournal(Path(job.state_dir), job.intent)
    action = job.action
    path = (Path(job.plan_dir) / action.path).resolve()
    started = datetime.now(UTC)
    argv: list[str] = []
    rc: int | None = None
    out = err = ""
    error: str | None = None
    try:
        try:
            args = render_args(action.args, job.context)
        except PlanTemplateError as exc:
            raise ScriptError(str(exc), operation="run_script", hint="fix the argument template in the plan") from None
        argv = [str(path), *args]
        if not path.is_file():
            raise ScriptError(f"script {path} does not exist", operation="run_script",
                              hint="paths are relative to the plan file")
        if job.host is None:
            if not os.access(path, os.X_OK):
                raise ScriptError(f"script {path} is not executable", operation="run_script", hint=f"chmod +x {path}")
            try:
                proc = subprocess.run(argv, capture_output=True, timeout=action.timeout_seconds, check=False,
                                      env={**os.environ, **job.env()}, cwd=job.plan_dir, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                out, err = _text(exc.stdout), _text(exc.stderr)
                raise ScriptError(f"script {action.name} timed out after {action.timeout_seconds} s",
                                  operation="run_script", hint="raise timeout_seconds or check the script") from None
            rc, out, err = proc.returncode, _text(proc.stdout), _text(proc.stderr)
        else:
            code, bout, berr = run_remote(job.host, path, args, job.env(), action.timeout_seconds, resolve_secret)
            rc, out, err = code, _text(bout), _text(berr)
        if out:
            log.info("%s stdout:\n%s", label, out[-LOG_CHARS:])
        if err:
            log.info("%s stderr:\n%s", label, err[-LOG_CHARS:])
        if rc != 0:
            raise ScriptError(f"script {action.name} exited with {rc}", host=job.host.name if job.host else None,
                              operation="run_script", hint="read its output in the run log")
    except Exception as exc:
        error = str(exc) if isinstance(exc, SiteRecoveryError) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        rec = ScriptRecord(step_id=job.id, action=action.name, group=job.context["group"]["name"],
                           vm=(job.context.get("vm") or {}).get("name"), host=job.host.name if job.host else None,
                           argv=tuple(argv), status="failed" if error else "completed", returncode=rc,
                           started_at=started, finished_at=datetime.now(UTC), stdout=out[-REPORT_CHARS:],
                           stderr=err[-REPORT_CHARS:], error=error).model_dump(mode="json")
        journal.add("script", job.id, flow_run, rec)
    return rec
