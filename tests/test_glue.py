"""GLUE reader (real shared files) and metrics (against independent computations)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import tasks
from tasks.base import DataUnavailable, MalformedData

needs_data = pytest.mark.skipif(not os.environ.get("HARNESS_DATA_DIR"),
                                reason="HARNESS_DATA_DIR not set (tox and .ci/run set it)")

# Official GLUE sizes (MRPC train 3,668 is rebuilt from the source files; the shipped
# train.tsv lacks one pair); QNLI ships dev only here.
ROWS = {("glue/cola", "train"): 8551, ("glue/cola", "dev"): 1043,
        ("glue/sst2", "train"): 67349, ("glue/sst2", "dev"): 872,
        ("glue/mrpc", "train"): 3668, ("glue/mrpc", "dev"): 408,
        ("glue/stsb", "train"): 5749, ("glue/stsb", "dev"): 1500,
        ("glue/rte", "train"): 2490, ("glue/rte", "dev"): 277,
        ("glue/wnli", "train"): 635, ("glue/wnli", "dev"): 71,
        ("glue/qnli", "dev"): 5463}


@needs_data
@pytest.mark.parametrize("task,split", sorted(ROWS))
def test_reader_row_counts_on_shared_files(task, split):
    examples = tasks.get_task(task).load(split)
    assert len(examples) == ROWS[(task, split)]


@needs_data
def test_reader_labels_and_fields():
    sst2 = tasks.get_task("glue/sst2").load("dev")
    assert sum(e.label for e in sst2) == 444 and sst2[0].text_b is None
    mrpc = tasks.get_task("glue/mrpc").load("dev")
    assert sum(e.label for e in mrpc) == 279 and mrpc[0].text_b
    cola = tasks.get_task("glue/cola").load("dev")
    assert sum(e.label for e in cola) == 721
    qnli = tasks.get_task("glue/qnli").load("dev")
    assert sum(1 - e.label for e in qnli) == 2702  # entailment = 0
    stsb = tasks.get_task("glue/stsb").load("dev")
    assert all(0.0 <= e.label <= 5.0 for e in stsb) and isinstance(stsb[0].label, float)


def test_group_expansion_and_unknown_task():
    assert tasks.expand("glue") == ["glue/cola", "glue/sst2", "glue/mrpc", "glue/stsb", "glue/qqp",
                                    "glue/mnli", "glue/qnli", "glue/rte", "glue/wnli"]
    assert tasks.expand("glue/rte") == ["glue/rte"]
    with pytest.raises(tasks.UnknownTaskError, match="unknown task 'glue/nope'.*glue/rte"):
        tasks.expand("glue/nope")


def test_missing_data_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailable) as e:
        tasks.get_task("glue/mnli").load("train", data_dir=str(tmp_path))
    assert "HARNESS_DATA_DIR" in str(e.value) or str(tmp_path) in str(e.value)
    assert "hub" in str(e.value)
    assert tasks.get_task("glue/mnli").availability(str(tmp_path)) is not None


def test_malformed_rows_name_file_and_line(tmp_path):
    d = tmp_path / "glue" / "rte"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly-two\n")
    with pytest.raises(MalformedData, match=r"train.tsv:3: expected at least 4"):
        tasks.get_task("glue/rte").load("train", data_dir=str(tmp_path))
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(MalformedData, match=r"train.tsv:2: bad label 'maybe'"):
        tasks.get_task("glue/rte").load("train", data_dir=str(tmp_path))


def test_original_glue_folder_names_are_read(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    (d / "dev.tsv").write_text('sentence\tlabel\nit "works" \t1\nno\t0\n')
    ex = tasks.get_task("glue/sst2").load("dev", data_dir=str(tmp_path))
    assert [e.label for e in ex] == [1, 0] and ex[0].text_a == 'it "works" '


# -- metrics ---------------------------------------------------------------------------------
P = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
Y = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])


def _hand_mcc(p, y):
    tp = int(((p == 1) & (y == 1)).sum()); tn = int(((p == 0) & (y == 0)).sum())
    fp = int(((p == 1) & (y == 0)).sum()); fn = int(((p == 0) & (y == 1)).sum())
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def test_classification_metrics_equal_sklearn_and_hand_values():
    cola = tasks.get_task("glue/cola").compute_metrics(P, Y)
    assert cola == {"matthews": pytest.approx(matthews_corrcoef(Y, P))}
    assert cola["matthews"] == pytest.approx(_hand_mcc(P, Y))  # tp4 tn3 fp2 fn1
    mrpc = tasks.get_task("glue/mrpc").compute_metrics(P, Y)
    assert mrpc["accuracy"] == pytest.approx(accuracy_score(Y, P)) == pytest.approx(0.7)
    assert mrpc["f1"] == pytest.approx(f1_score(Y, P)) == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    assert tasks.get_task("glue/qqp").compute_metrics(P, Y) == mrpc
    for name in ("glue/sst2", "glue/qnli", "glue/rte", "glue/wnli"):
        assert tasks.get_task(name).compute_metrics(P, Y) == {"accuracy": pytest.approx(0.7)}
    mnli = tasks.get_task("glue/mnli").compute_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    assert mnli == {"accuracy": pytest.approx(0.75)}


def test_regression_metrics_equal_scipy_and_hand_values():
    from scipy.stats import pearsonr, spearmanr

    p = np.array([0.5, 2.0, 3.1, 4.8, 1.0])
    y = np.array([0.0, 2.5, 3.0, 5.0, 2.0])
    m = tasks.get_task("glue/stsb").compute_metrics(p, y)
    assert m["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert m["pearson"] == pytest.approx(np.corrcoef(p, y)[0, 1])
    # ranks p: 1 3 4 5 2; y: 1 3 4 5 2 -> identical orderings
    assert m["spearman"] == pytest.approx(spearmanr(p, y)[0]) == pytest.approx(1.0)
    assert tasks.get_task("glue/stsb").compute_metrics(np.ones(5), y) == {"pearson": 0.0, "spearman": 0.0}
