"""Labels (`elude label`): computed from a labelled set, carried by a sidecar file, written into the ONNX.

The ONNX test reads them back from the exported file alone (`read_contract`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from elude_export.cli import main
from elude_export.data.concepts import IMAGE_SIZE, load_split, object_masks
from elude_export.data.sources import open_source
from elude_export.evidence.labels import (
    UNLABELLED, LabelFileError, compute_labels, describe_top, load_labels, wilson_interval,
)
from elude_export.export.contract import SubunitLabel, labels_metadata, read_contract
from elude_export.export.onnx_export import export_onnx
from elude_export.export.options import ExportOptions
from plan_factory import small_fitted_plan

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "blocks.2.mlp"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    loaded, plan = small_fitted_plan(seed=1, layer=LAYER, k_max=2)
    folder = tmp_path_factory.mktemp("labels")
    labels = compute_labels(loaded, plan, open_source("embedded:test"), top_n=8, limit=160)
    checkpoint = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(checkpoint))
    return loaded, plan, labels, labels.write(folder / "labels.json"), plan.save(folder / "plan.safetensors"), checkpoint


def test_wilson_interval_known_values():
    low, high = wilson_interval(18, 20)
    assert low == pytest.approx(0.699, abs=1e-3) and high == pytest.approx(0.972, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_describe_top_names_dominant_share_runner_up_and_images():
    label = describe_top(np.array([2, 2, 2, 1, 1]), ["a", "b", "c"], np.arange(10, 15))
    assert (label.dominant, label.share, label.runner_up, label.n) == ("c", 0.6, "b", 5)
    assert label.text == "c (0.60)" and label.top_images == [10, 11, 12, 13, 14]
    assert label.ci[0] < 0.6 < label.ci[1]


def test_every_unit_and_subunit_is_labelled_and_rare_ones_say_unlabelled(labelled):
    _, plan, labels, _, _, _ = labelled
    layer = plan.layer(LAYER)
    units = {f"{LAYER}/{j:04d}" for j in range(layer.n_units)}
    assert set(labels.labels) == units | set(layer.subunit_names())
    assert labels.basis == "concept" and labels.plan_fingerprint == plan.fingerprint()
    for label in labels.labels.values():
        if label.text == UNLABELLED:
            assert label.n < 8 and label.dominant is None
        else:
            assert label.n == 8 and label.text.startswith(label.dominant) and ", class " in label.text
            assert label.ci[0] <= label.share <= label.ci[1] and len(label.top_images) == 5


def test_label_file_round_trip_and_bad_files_are_refused(labelled, tmp_path):
    _, plan, labels, path, _, _ = labelled
    assert load_labels(path, plan.fingerprint()).labels == labels.labels
    with pytest.raises(LabelFileError, match="another plan"):
        load_labels(path, "0" * 16)
    truncated = tmp_path / "cut.json"
    truncated.write_text(path.read_text()[:200])
    with pytest.raises(LabelFileError, match="not valid JSON"):
        load_labels(truncated)
    raw = json.loads(path.read_text())
    for change, message in (({"format": "other"}, "not an ELUDe labels file"), ({"schema_version": 9}, "schema"),
                            ({"labels": []}, "must be an object"),
                            ({"labels": {"x/0000.0": {"share": 1}}}, "malformed label")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**raw, **change}))
        with pytest.raises(LabelFileError, match=message):
            load_labels(bad)


def test_labels_budget_drops_details_first_then_labels():
    labels = {f"b/{j:04d}.{k}": SubunitLabel("red circle (0.90)", "red circle", 0.9, [0.7, 0.97], "red square",
                                             [1, 2, 3, 4, 5], 20) for j in range(50) for k in range(2)}
    labels.update({f"b/{j:04d}": SubunitLabel("blue cross (0.5)") for j in range(50)})
    full = labels_metadata(labels)
    assert json.loads(full)["b/0000.0"]["top_images"] == [1, 2, 3, 4, 5]
    no_images = json.loads(labels_metadata(labels, len(full) - 1))
    assert "top_images" not in no_images["b/0000.0"] and "ci" in no_images["b/0000.0"]
    text_only = json.dumps({name: {"text": label.text} for name, label in labels.items()})
    texts = json.loads(labels_metadata(labels, len(text_only)))
    assert set(texts["b/0000.0"]) == {"text"} and len(texts) == 150
    tiny = json.loads(labels_metadata(labels, 400))
    assert tiny and all("." in name for name in tiny) and len(json.dumps(tiny)) <= 400


def test_export_writes_labels_that_read_back_from_the_onnx_file_alone(labelled, tmp_path):
    loaded, plan, labels, _, _, _ = labelled
    path = export_onnx(loaded, plan, tmp_path / "m.onnx", taps=f"{LAYER}:max",
                       options=ExportOptions(exporter="torchscript"), labels=labels.labels)
    contract = read_contract(path)
    assert contract.labels == labels.labels
    name = plan.layer(LAYER).subunit_names()[0]
    assert contract.label_text(name) == labels.labels[name].text


@pytest.mark.parametrize("case, message", [("foreign", "another plan"), ("truncated", "not valid JSON"),
                                           ("schema", "not an ELUDe labels file"), ("missing", "not found")])
def test_cli_export_refuses_bad_label_files_in_one_line(labelled, tmp_path, case, message):
    _, _, _, path, plan_path, checkpoint = labelled
    bad = tmp_path / "labels.json"
    raw = json.loads(path.read_text())
    if case == "foreign":
        bad.write_text(json.dumps({**raw, "plan_fingerprint": "f" * 16}))
    elif case == "truncated":
        bad.write_text(path.read_text()[:-40])
    elif case == "schema":
        bad.write_text(json.dumps({"labels": {}}))
    result = CliRunner().invoke(main, ["export", "--plan", str(plan_path), "--checkpoint", str(checkpoint),
                                       "-o", str(tmp_path / "m.onnx"), "--labels", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_cli_label_writes_the_sidecar(labelled, tmp_path):
    _, plan, _, _, plan_path, checkpoint = labelled
    out = tmp_path / "l.json"
    result = CliRunner().invoke(main, ["label", "--plan", str(plan_path), "--checkpoint", str(checkpoint),
                                       "--limit", "64", "--top-n", "4", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "labelled" in result.output
    assert load_labels(out, plan.fingerprint()).top_n == 4
    unlabelled = CliRunner().invoke(main, ["label", "--plan", str(plan_path), "--data", "embedded:nosuch"])
    assert unlabelled.exit_code == 2 and unlabelled.output.startswith("error:")


def test_object_masks_are_where_the_object_was_drawn():
    data = load_split("test")
    masks = object_masks(data)
    assert masks.shape == (len(data), IMAGE_SIZE, IMAGE_SIZE) and 0.1 < masks.mean() < 0.4
    solid = np.nonzero(data.factors["texture"][:300] == 0)[0]
    for i in solid[:20]:  # solid objects: inside the mask the pixels are the (bright) object colour
        inside = data.images[i][masks[i]].astype(float).mean(0)
        outside = data.images[i][~masks[i]].astype(float).mean(0)
        assert inside.max() > 150 and outside.max() < 90


def test_cli_inspect_shows_each_subunits_label_from_json_or_onnx(labelled, tmp_path):
    loaded, plan, labels, path, plan_path, _ = labelled
    names = plan.layer(LAYER).subunit_names()
    result = CliRunner().invoke(main, ["inspect", str(plan_path), "--labels", str(path)])
    assert result.exit_code == 0, result.output
    for name in (names[0], names[-1]):
        assert f"  {name}  {labels.labels[name].text}\n" in result.output
    onnx_path = export_onnx(loaded, plan, tmp_path / "m.onnx", taps=f"{LAYER}:max",
                            options=ExportOptions(exporter="torchscript"), labels=labels.labels)
    from_onnx = CliRunner().invoke(main, ["inspect", str(plan_path), "--labels", str(onnx_path)])
    assert from_onnx.exit_code == 0, from_onnx.output
    assert f"  {names[1]}  {labels.labels[names[1]].text}\n" in from_onnx.output


@pytest.mark.parametrize("case, message", [("truncated", "not valid JSON"), ("foreign", "another plan"),
                                           ("missing", "not found"), ("not onnx", "cannot read labels")])
def test_cli_inspect_refuses_bad_label_files_in_one_line(labelled, tmp_path, case, message):
    _, _, _, path, plan_path, _ = labelled
    bad = tmp_path / ("labels.onnx" if case == "not onnx" else "labels.json")
    if case == "truncated":
        bad.write_text(path.read_text()[:-40])
    elif case == "foreign":
        bad.write_text(json.dumps({**json.loads(path.read_text()), "plan_fingerprint": "f" * 16}))
    elif case == "not onnx":
        bad.write_text("this is not an onnx file")
    result = CliRunner().invoke(main, ["inspect", str(plan_path), "--labels", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_cli_steer_evaluate_prints_the_concept_table_from_a_label_file(labelled, tmp_path):
    _, plan, _, path, plan_path, checkpoint = labelled
    out = tmp_path / "sel.json"
    result = CliRunner().invoke(main, ["steer", "--evaluate", "--plan", str(plan_path), "--checkpoint", str(checkpoint),
                                       "--labels", str(path), "--per-concept", "3", "--min-share", "0.3",
                                       "--device", "cpu", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "median selectivity (margin, headline)" in result.output and "| red circle |" in result.output
    saved = json.loads(out.read_text())
    assert saved["layers"] == [LAYER] and saved["images_per_concept"] == 3
    assert {row["method"] for row in saved["rows"]} == {"sub-units", "units"} and len(saved["rows"]) == 32


@pytest.mark.parametrize("extra, message", [(["--subunit", f"{LAYER}/0000.0"], "drop --subunit"),
                                            ([], None), (["--data", "digits:test"], "ground-truth concepts")])
def test_cli_steer_evaluate_refuses_bad_requests_in_one_line(labelled, extra, message):
    _, _, _, path, plan_path, checkpoint = labelled
    args = ["steer", "--plan", str(plan_path), "--checkpoint", str(checkpoint), *extra]
    if message is not None:
        args.append("--evaluate")
    else:
        message = "give --subunit NAME"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output and "Traceback" not in result.output
