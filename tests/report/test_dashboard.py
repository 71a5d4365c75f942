"""The study database of a run opens in optuna-dashboard as it is: read the way the dashboard reads it."""

import csv
import io
import json
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import yaml
from optuna.trial import TrialState


def test_study_db_loads_with_optunas_public_storage_api(report_run):
    # what `optuna-dashboard sqlite:///runs/NAME/study.db` does first: an RDBStorage, every study, then each one
    storage = optuna.storages.RDBStorage(f"sqlite:///{report_run / 'study.db'}")
    studies = storage.get_all_studies()
    assert [s.study_name for s in studies] == ["report"]
    assert studies[0].directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    study = optuna.load_study(study_name="report", storage=storage)
    assert set(study.user_attrs["parents"]) == {"base", "m1", "m2", "m3"}
    trials = study.get_trials()
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert len(t.values) == 2 and t.params and all(0 <= v <= 1 for v in t.params.values())
        assert {"scores", "recipe", "fidelity", "seconds", "scalarized"} <= set(t.user_attrs)
        assert yaml.safe_load(t.user_attrs["recipe"])["merge_method"] == "dare_ties"
        json.dumps(t.user_attrs)  # the dashboard serves user attrs as JSON


def _get(app, path: str) -> tuple[str, bytes]:
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    status = {}

    def start_response(line, headers, exc_info=None):
        status["line"] = line

    body = b"".join(app(environ, start_response))
    return status["line"], body


def test_optuna_dashboard_serves_the_study(report_run):
    dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the dev extra")
    # the dashboard's own WSGI app (what `optuna-dashboard URL` serves), called in-process: no server, no network
    app = dashboard.wsgi(f"sqlite:///{report_run / 'study.db'}")
    status, body = _get(app, "/api/studies")
    assert status.startswith("200")
    summaries = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in summaries] == ["report"]
    status, body = _get(app, f"/api/studies/{summaries[0]['study_id']}")
    assert status.startswith("200")
    detail = json.loads(body)
    assert len(detail["trials"]) == 10 and detail["best_trials"]
    first = detail["trials"][0]
    assert first["state"] == "Complete" and len(first["values"]) == 2
    assert {"scores", "recipe", "fidelity"} <= {a["key"] for a in first["user_attrs"]}
    assert {p["name"] for p in first["params"]} == {"w.m1.g0", "w.m1.g1", "w.m2.g0", "w.m2.g1", "w.m3.g0",
                                                    "w.m3.g1", "d.m1.g0", "d.m1.g1", "d.m2.g0", "d.m2.g1",
                                                    "d.m3.g0", "d.m3.g1"}
    status, body = _get(app, f"/csv/{summaries[0]['study_id']}")
    assert status.startswith("200") and len(list(csv.reader(io.StringIO(body.decode())))) == 11
