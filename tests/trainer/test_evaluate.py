"""``vsearch evaluate`` and trainer.evaluate on real photos: several models and baselines in one
run, a table, report.json and report.png, labelled folders and judgments CSVs."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from vsearch.cli import main
from vsearch.predictor.model_dir import read_meta
from vsearch.trainer.data import list_images, split_holdout
from vsearch.trainer.evaluate import evaluate_models, format_table, store_in_meta, verdicts, write_outputs


def test_compares_models_and_baselines_on_a_labelled_folder(photo_folder, model_dirs, tmp_path):
    dirs = [str(model_dirs["resnet18"]), str(model_dirs["vit-small"])]
    report = evaluate_models(dirs, str(photo_folder), ks=(1, 5), baselines=["raw-pixels", "random-init"])
    assert [r["kind"] for r in report["results"]] == ["model", "model", "raw-pixels", "random-init"]
    for r in report["results"]:
        assert r["queries_evaluated"] == 32 and r["queries_without_relevant"] == 0
        assert 0.0 <= r["metrics"]["map@r"] <= 1.0
        assert set(r["per_class_map@r"]) == {p.name for p in photo_folder.iterdir()}
    table = format_table(report)
    assert "tiny-resnet18:1" in table and "raw-pixels" in table and "recall@5" in table
    js, png = write_outputs(report, tmp_path / "rep")
    assert json.loads(js.read_text())["results"][0]["name"] == "tiny-resnet18:1"
    with Image.open(png) as im:
        assert im.size[0] > 500

    own = tmp_path / "own-copy"               # the session's model directories stay as they are
    shutil.copytree(dirs[0], own)
    report["results"][0]["model_dir"] = str(own)
    store_in_meta(str(own), report)
    ev = read_meta(own).evaluation
    assert ev["queries_evaluated"] == 32 and "raw-pixels" in ev["baselines"]


def test_held_out_split_is_stable_and_disjoint(photo_folder):
    records = list_images(photo_folder)
    train1, held1 = split_holdout(records, 0.25, seed=3)
    train2, held2 = split_holdout(list(reversed(records)), 0.25, seed=3)
    assert {r.source for r in held1} == {r.source for r in held2}
    assert not {r.source for r in held1} & {r.source for r in train1}
    assert len(held1) == 8 and {r.label for r in held1} == {r.label for r in records}


def test_cli_with_a_judgments_csv(photo_folder, tiny_model_dir, tmp_path, capsys):
    files = sorted(p for p in photo_folder.rglob("*.jpg"))
    q, same, other = files[0], files[1], files[-1]
    csv = tmp_path / "judgments.csv"
    csv.write_text(f"query,candidate,grade\n{q},{same},5\n{q},{other},0\n{files[8]},{files[9]},3\n")
    out = tmp_path / "rep"
    rc = main(["evaluate", "--model-dir", str(tiny_model_dir), "--data", str(csv), "--k", "1,2",
               "--baselines", "raw-pixels", "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "ndcg@2" in printed and "recall@1" in printed and "raw-pixels" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"kind": "judgments", "source": str(csv), "queries": 2,
                              "candidates": 5, "judgments": 3}
    assert all(r["queries_evaluated"] == 2 for r in report["results"])
    assert (out / "report.png").stat().st_size > 1000


def test_a_golden_set_without_relevant_items_still_gives_valid_json(photo_folder, tiny_model_dir, tmp_path):
    """Every grade 0: no query has a relevant item, every average is undefined (NaN in
    numpy). report.json must still be JSON that any reader parses: null, never NaN."""
    files = sorted(p for p in photo_folder.rglob("*.jpg"))
    csv = tmp_path / "judgments.csv"
    csv.write_text(f"query,candidate,grade\n{files[0]},{files[1]},0\n{files[2]},{files[3]},0\n")
    out = tmp_path / "rep"
    assert main(["evaluate", "--model-dir", str(tiny_model_dir), "--data", str(csv), "--out", str(out)]) == 0

    def no_constants(name):
        raise AssertionError(f"report.json holds {name}, which is not JSON")

    report = json.loads((out / "report.json").read_text(), parse_constant=no_constants)
    metrics = report["results"][0]["metrics"]
    assert metrics["map"] is None and report["results"][0]["queries_without_relevant"] == 2


def test_cli_errors_are_clear(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "j.csv"
    bad.write_text("query,candidate,grade\na.jpg,b.jpg,9\n")
    assert main(["evaluate", "--model-dir", str(tiny_model_dir), "--data", str(bad)]) == 2
    assert "outside 0..5" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path), "--baselines", "nonsense"]) == 2
    assert "unknown baseline" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    assert "at least one --model-dir" in capsys.readouterr().err


@pytest.mark.parametrize("split,expected", [("all", 32), ("held-out", 8), ("train", 24)])
def test_splits(photo_folder, tiny_model_dir, split, expected):
    report = evaluate_models([str(tiny_model_dir)], str(photo_folder), ks=(1,), split=split,
                             holdout=0.25, split_seed=0)
    assert report["results"][0]["queries"] == expected


def _result(name, kind, map_r, r1, ndcg):
    return {"name": name, "kind": kind, "model_dir": name if kind == "model" else None,
            "metrics": {"map@r": map_r, "recall@1": r1, "ndcg@10": ndcg}}


def test_the_verdict_needs_every_metric_to_be_better():
    report = {"results": [_result("new", "model", 0.09, 0.02, 0.15),
                          _result("old", "model", 0.08, 0.03, 0.14),
                          _result("raw-pixels 32x32", "raw-pixels", 0.04, 0.017, 0.085),
                          _result("random-init", "random-init", 0.02, 0.01, 0.05)]}
    first, second = verdicts(report)
    assert first["beats_baselines"] is True and first["beats_all"] is False   # worse recall@1 than old
    assert "new DOES NOT BEAT old (map@r 0.0900 vs 0.0800, recall@1 0.0200 vs 0.0300" in first["text"]
    assert "new beats raw-pixels 32x32" in first["text"]
    assert set(second["against"]) == {"raw-pixels 32x32", "random-init"}     # later models: baselines only
    report["results"][2]["metrics"]["ndcg@10"] = 0.2                          # pixels now win one metric
    assert verdicts(report)[0]["beats_baselines"] is False


def test_evaluate_prints_the_verdict_and_stores_it_for_the_gate(photo_folder, tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    rc = main(["evaluate", "--model-dir", str(d), "--data", str(photo_folder), "--k", "1,10",
               "--baselines", "raw-pixels,random-init", "--out", str(tmp_path / "rep"), "--write-meta"])
    printed = capsys.readouterr().out
    assert rc == 0
    ev = read_meta(d).evaluation
    v = ev["verdict"]
    assert set(v["against"]) == {"raw-pixels 32x32", "random-init resnet18"}
    for name, a in v["against"].items():
        assert a["beats"] == all(ev["metrics"][k] > ev["baselines"][a["kind"]][k] for k in v["metrics"])
        assert f"{'beats' if a['beats'] else 'DOES NOT BEAT'} {name}" in printed
    assert v["beats_baselines"] == all(a["beats"] for a in v["against"].values())
