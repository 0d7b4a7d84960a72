"""A run sent to a lost site's work queue fails fast and says why (issue 17): the automation `make ui`
creates (templates/site-unreachable.automation.yaml), on the real Prefect server with its services. No
worker polls `site-lost`: Prefect marks the run Late, and the automation fails it with the reason. A run
on a queue that is not a site's is left alone. The automation's wait is shortened here (120 s -> 20 s);
everything else is the template as `make ui` creates it, through the same `prefect automation create`."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from test_plan_crash import _api

from siterecovery.testing.prefect_server import PrefectServer
from siterecovery.ui import SITE_AUTOMATION, prefect_exe

pytestmark = [pytest.mark.prefect_server, pytest.mark.timeout(400)]


def test_a_run_on_a_lost_sites_queue_fails_fast_and_says_why(server: PrefectServer, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    tag = uuid.uuid4().hex[:8]
    spec = yaml.safe_load(SITE_AUTOMATION.read_text())
    spec["name"] = f"{spec['name']}-{tag}"
    spec["trigger"]["within"] = 20
    path = tmp_path / "site-unreachable.automation.yaml"
    path.write_text(yaml.safe_dump(spec))
    subprocess.run([prefect_exe(), "--no-prompt", "automation", "create", "--from-file", str(path)],
                   env=server.env(), check=True, capture_output=True, timeout=120)
    pool = f"lost-{tag}"
    with _api(server), get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = client.create_flow_from_name(f"site-check-{tag}")
            runs = {}
            for queue in ("site-lost", "elsewhere"):
                dep = client.create_deployment(flow_id=flow_id, name=f"{queue}-{tag}", work_pool_name=pool,
                                               work_queue_name=queue, entrypoint="nowhere.py:f")
                runs[queue] = client.create_flow_run_from_deployment(dep).id
            deadline = time.monotonic() + 300
            while True:
                lost = client.read_flow_run(runs["site-lost"])
                if lost.state is not None and lost.state.type.value == "FAILED":
                    break
                assert time.monotonic() < deadline, f"still {lost.state}"
                time.sleep(2)
            assert "No worker of this run's site picked it up" in (lost.state.message or ""), lost.state
            other = client.read_flow_run(runs["elsewhere"])
            assert other.state is not None and other.state.type.value == "SCHEDULED", other.state  # Late, untouched
            assert other.state.name == "Late"
        finally:
            for a in client.read_automations_by_name(spec["name"]):
                client.delete_automation(a.id)
            client.delete_work_pool(pool)
