"""bench.trainer's quality and latency parts, end to end with a tiny real model: one table row
per baseline, the untouched model and the fine-tune, with minutes and a verdict."""

from __future__ import annotations

import math

from bench import posthoc
from bench.trainer import latency_rows, print_quality, quality_rows
from vsearch.predictor.model_dir import read_meta


def test_quality_rows_compare_four_models_per_collection(tiny_model_dir, tmp_path, capsys):
    rows = quality_rows(tiny_model_dir, ["textures"], tmp_path, epochs=3)
    tex = [r for r in rows if r["collection"] == "textures"]
    assert [r["model"] for r in tex] == ["raw pixels 32x32", "random init", "default model",
                                         "fine-tuned (default recipe)"]
    assert all(0 <= r[k] <= 1 for r in tex for k in ("map@r", "recall@1", "ndcg@10"))
    fine = tex[-1]
    assert fine["minutes"] > 0 and isinstance(fine["verdict"], bool)
    better = all(fine[k] > r[k] for r in tex[:3] for k in ("map@r", "recall@1", "ndcg@10"))
    assert fine["verdict"] == better
    # the export is a model directory with the selection's record; the row says what it chose
    sel = read_meta(tmp_path / "finetuned" / "textures").training["selection"]
    assert fine["chosen"] == sel["chosen"] and fine["kept_start"] == sel["kept_start"]
    if sel["kept_start"]:            # the starting model unchanged: its figures exactly
        assert all(fine[k] == tex[2][k] for k in ("map@r", "recall@1", "ndcg@10"))
    print_quality(rows)
    assert "fine-tuned (default recipe)" in capsys.readouterr().out


def test_latency_rows_time_one_query_embed(tiny_model_dir):
    [(d, median, p90)] = latency_rows([tiny_model_dir], n=12, rounds=1)
    assert d == tiny_model_dir and 0 < median <= p90 and math.isfinite(p90)


def test_posthoc_variants_print_one_row_each(photo_folder, tiny_model_dir, capsys):
    assert posthoc.main(["--data", str(photo_folder), "--model-dir", str(tiny_model_dir),
                         "--shrinkage", "1", "--sizes", "80", "--layers", "--raw", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "mAP@R" in line]
    # raw (plain, whitened); at 64 px: last stage avg, GeM, stage 1 (the tiny net has 2 stages)
    # avg, each plain and whitened; at 80 px: last stage avg plain and whitened
    assert len(lines) == 2 + 3 * 2 + 2 and "whitened (shrinkage 1)" in lines[1]
