"""The benchmark harness: any importable model, shared metrics, CSV + Markdown + plot, failures kept."""

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from anomalib_dadf.anomaly_map import AnomalyMapGenerator
from anomalib_dadf.benchmark import TimmFastflow, import_class
from anomalib_dadf.benchmark.__main__ import cap_seeds, input_sizes, merged, read_rows, record_run, recorded_runs
from anomalib_dadf.benchmark.job import DadfBenchmarkJobGenerator, build, measure
from anomalib_dadf.benchmark.report import ranking, summarise
from anomalib_dadf.data.synthetic import make_mvtec_loco
from anomalib_dadf.post_processing import RankKeepingPostProcessor

from .conftest import TINY_MODEL

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_fastflow_runs_its_cnn_path_on_another_timm_backbone() -> None:
    model = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2).eval()
    channels = [block.dims_in[0][0] for block in model.model.fast_flow_blocks]
    assert channels == [24, 40, 112], "Lite0's maps at strides 4, 8, 16"
    output = model.model(torch.rand(1, 3, 256, 256))
    assert output.anomaly_map.shape == (1, 1, 256, 256)
    assert output.anomaly_map.max() <= 0, "anomalib's negative-probability map"
    log_likelihood = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2, anomaly_map="log_likelihood")
    assert log_likelihood.eval().model(torch.rand(1, 3, 256, 256)).anomaly_map.min() > 0


def test_fastflow_models_the_backbone_maps_it_is_given() -> None:
    model = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2, out_indices=[2, 3, 4])
    assert [block.dims_in[0][1:] for block in model.model.fast_flow_blocks] == [(32, 32), (16, 16), (8, 8)]
    assert [norm.normalized_shape[0] for norm in model.model.norms] == [40, 112, 320], "strides 8, 16, 32"
    assert model.hparams["out_indices"] == [2, 3, 4], "saved, so that a checkpoint rebuilds the same flows"
    assert model.eval().model(torch.rand(1, 3, 256, 256)).anomaly_map.shape == (1, 1, 256, 256)


def test_fastflow_can_score_images_with_other_maps_than_it_draws_and_by_their_top_share() -> None:
    model = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2, out_indices=[1, 2, 3, 4],
                         map_out_indices=[1, 2, 3], score_out_indices=[2, 3, 4], score_top_fraction=0.5).eval()
    assert (model.hparams["map_out_indices"], model.hparams["score_out_indices"]) == ([1, 2, 3], [2, 3, 4])
    assert model.hparams["score_top_fraction"] == 0.5
    images = torch.rand(1, 3, 256, 256)  # anomalib's default input size
    with torch.no_grad():
        latents, _ = model.model.flow(images)
        output = model.model(images)
    every_map = AnomalyMapGenerator((256, 256))
    assert torch.equal(output.anomaly_map, every_map(latents[:3]))
    score_map = every_map(latents[1:]).flatten(start_dim=-2)
    assert torch.allclose(output.pred_score, score_map.topk(256 * 128, dim=-1).values.mean(dim=-1))


def test_fastflow_can_blur_its_map_and_score_inside_its_border_band_as_dadf_does() -> None:
    model = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2, map_sigma=4.0,
                         score_margin=0.1).eval()
    assert (model.hparams["map_sigma"], model.hparams["score_margin"]) == (4.0, 0.1)
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        latents, _ = model.model.flow(images)
        output = model.model(images)
    expected = AnomalyMapGenerator((256, 256), sigma=4.0, score_margin=0.1).score(latents)
    assert torch.allclose(output.anomaly_map, expected.anomaly_map)
    assert torch.allclose(output.pred_score, expected.pred_score)


def test_fastflow_can_model_the_pooled_backbone_maps() -> None:
    model = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2, prior_pooling=3).eval()
    assert model.hparams["prior_pooling"] == 3
    images = torch.rand(1, 3, 256, 256)  # anomalib's default input size
    with torch.no_grad():
        features = model.model._get_cnn_features(images)
        raw = model.model.feature_extractor(images)
    pool = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    expected = [norm(pool(feature)) for norm, feature in zip(model.model.norms, raw, strict=True)]
    assert all(torch.allclose(got, want) for got, want in zip(features, expected, strict=True))
    assert not torch.allclose(features[0], model.model.norms[0](raw[0]))


def test_fastflow_can_condition_its_couplings_on_the_positions() -> None:
    model = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2, flow_positions=8).eval()
    plain = TimmFastflow(backbone="tf_efficientnet_lite0", pre_trained=False, flow_steps=2).eval()
    assert model.hparams["flow_positions"] == 8
    for block, plain_block in zip(model.model.fast_flow_blocks, plain.model.fast_flow_blocks, strict=True):
        assert block.positions.shape[1] == 8
        subnets = [step.subnet[0] for step in block.module_list]
        assert [conv.kernel_size for conv in subnets] == [conv.kernel_size for conv in (
            step.subnet[0] for step in plain_block.module_list)], "FastFlow's kernels, 3 then 1"
        assert [conv.in_channels for conv in subnets] == [step.subnet[0].in_channels + 8 for step in plain_block.module_list]
    with torch.no_grad():
        output = model.model(torch.rand(2, 3, 256, 256))
    assert output.anomaly_map.shape == (2, 1, 256, 256)


def test_the_benchmark_measures_every_model_with_the_rank_keeping_post_processor() -> None:
    spec = {"data": {"class_path": "anomalib_dadf.data.MVTec", "init_args": {"root": "unused", "category": "x"}},
            "input_size": [64, 64]}
    for model in ({"class_path": "anomalib.models.Patchcore", "init_args": {"backbone": "resnet18", "pre_trained": False}},
                  {"class_path": "anomalib_dadf.Dadf", "init_args": {**TINY_MODEL}}):
        _, module, _ = build({**spec, "model": model})
        assert type(module.post_processor) is RankKeepingPostProcessor


def test_class_paths_outside_anomalib_models_resolve_and_bad_ones_are_named() -> None:
    assert import_class("anomalib_dadf.Dadf").__name__ == "Dadf"
    with pytest.raises(ValueError, match=r"Cannot import 'anomalib\.models\.NoSuchModel'"):
        import_class("anomalib.models.NoSuchModel")


def test_grid_writes_csv_markdown_and_plot_and_a_report_rewrite_keeps_the_csv(mvtec_root: Path, tmp_path: Path) -> None:
    loco = make_mvtec_loco(tmp_path / "loco")
    config = {
        "title": "tiny",
        "input_size": [64, 64],
        "cost_growth": True,
        "seeds": 2,
        "models": [
            {
                "name": "DADF",
                "class_path": "anomalib_dadf.Dadf",
                "init_args": {**TINY_MODEL, "reconstruction_epochs": 1, "flow_epochs": 1},
            },
            {
                "name": "PatchCore",
                "class_path": "anomalib.models.Patchcore",
                "init_args": {"backbone": "resnet18", "pre_trained": False, "coreset_sampling_ratio": 0.5},
                "seeds": 1,
            },
            {"name": "Broken", "class_path": "anomalib.models.NoSuchModel", "seeds": 1},
        ],
        "data": [
            {
                "name": "toy",
                "class_path": "anomalib_dadf.data.MVTec",
                "init_args": {"root": str(mvtec_root), "category": "widget", "num_workers": 0, "train_batch_size": 4},
            },
            {
                "name": "toy LOCO",
                "class_path": "anomalib.data.MVTecLOCO",
                "init_args": {"root": str(loco), "category": "box", "num_workers": 0, "train_batch_size": 4},
            },
        ],
    }
    config_path = tmp_path / "benchmark.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_dadf.benchmark", "--config", str(config_path), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    rows = read_rows(output / "results.csv")
    assert len(rows) == 2 * (2 + 1 + 1)
    ran = rows[rows["error"].isna()]
    assert set(zip(ran["data"], ran["model"], strict=True)) == {
        ("toy", "DADF"), ("toy", "PatchCore"), ("toy LOCO", "DADF"), ("toy LOCO", "PatchCore"),
    }
    assert ran["image_AUROC"].between(0, 1).all()
    assert ran["pixel_AUROC"].notna().all()
    assert ran.loc[ran["data"] == "toy LOCO", "pixel_SPRO"].between(0, 1).all()
    assert ran.loc[ran["data"] == "toy", "pixel_SPRO"].isna().all()
    assert (ran["peak_rss_mib"] > 100).all() and (ran["fit_s"] > 0).all() and (ran["ms_per_image"] > 0).all()
    assert (ran.loc[ran["model"] == "PatchCore", "trainable_params"] == 0).all()
    assert (ran.loc[ran["model"] == "DADF", "trainable_params"] > 0).all()
    assert rows.loc[rows["model"] == "Broken", "error"].str.contains("Cannot import").all()

    summary = (output / "summary.md").read_text()
    assert "| toy | DADF | 2 |" in summary
    assert "±" in summary
    assert "Failed runs" in summary
    assert (output / "image_auroc.png").stat().st_size > 1000
    assert (output / "cost_growth.png").stat().st_size > 1000
    assert "![cost growth](cost_growth.png)" in summary
    toy_size = len(list((mvtec_root / "widget" / "train" / "good").iterdir()))
    assert set(ran.loc[ran["data"] == "toy", "train_images"]) == {toy_size}
    assert set(ran.loc[ran["model"] == "DADF", "epochs"]) == {2}

    # A number that pandas' fast parser reads back as ...776: a rewrite of the rows would change its text.
    rows.loc[0, "fit_s"] = 2.7749541309967753
    rows.to_csv(output / "results.csv", index=False)
    rows_text = (output / "results.csv").read_bytes()
    rewritten = subprocess.run(
        [sys.executable, "-m", "anomalib_dadf.benchmark", "--config", str(config_path), "--output", str(output),
         "--report-only"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert rewritten.returncode == 0, (rewritten.stdout + rewritten.stderr)[-4000:]
    assert (output / "results.csv").read_bytes() == rows_text, "the rows a run wrote are never rewritten"
    summary = (output / "summary.md").read_text()
    assert "report rewritten from the results.csv" in summary
    (run,) = recorded_runs(output)
    assert f"- {run}" in summary and "--output" in run and "--report-only" not in run


def test_the_report_names_every_run_that_wrote_its_rows(tmp_path: Path) -> None:
    assert recorded_runs(tmp_path) == [], "a folder from before runs.txt was kept names no run"
    record_run(tmp_path, "whole grid", partial=False)
    assert record_run(tmp_path, "one cell", partial=True) == ["whole grid", "one cell"]
    assert recorded_runs(tmp_path) == ["whole grid", "one cell"]
    assert record_run(tmp_path, "whole grid again", partial=False) == ["whole grid again"]


CONFIG = {
    "models": [{"name": "A"}, {"name": "B"}, {"name": "C"}],
    "data": [{"name": "x"}, {"name": "y"}],
    "seeds": 2,
}


def test_part_of_the_grid_can_be_selected_and_unknown_names_are_named() -> None:
    jobs = list(DadfBenchmarkJobGenerator(models=["C"], data=["y"])(CONFIG))
    assert [(job.spec["data"]["name"], job.spec["model"]["name"], job.spec["seed"]) for job in jobs] == [
        ("y", "C", 0), ("y", "C", 1),
    ]
    unknown = r"No models entry named \['D'\] in the config; its models are \['A', 'B', 'C'\]"
    with pytest.raises(ValueError, match=unknown):
        list(DadfBenchmarkJobGenerator(models=["D"])(CONFIG))


def test_a_data_set_can_cap_the_seeds_of_every_model() -> None:
    config = {
        **CONFIG,
        "models": [{"name": "A", "seeds": 1}, {"name": "B"}],
        "data": [{"name": "x"}, {"name": "y", "seeds": 1}],
    }
    jobs = [(job.spec["data"]["name"], job.spec["model"]["name"]) for job in DadfBenchmarkJobGenerator()(config)]
    assert jobs == [("x", "A"), ("x", "B"), ("x", "B"), ("y", "A"), ("y", "B")]


def test_seeds_can_be_capped_for_a_first_pass() -> None:
    config = {**CONFIG, "data": [{"name": "x"}, {"name": "y", "seeds": 1}], "seeds": 3}
    cap_seeds(config, 2)
    jobs = [(job.spec["data"]["name"], job.spec["seed"]) for job in DadfBenchmarkJobGenerator(models=["A"])(config)]
    assert jobs == [("x", 0), ("x", 1), ("y", 0)]


def test_later_seeds_can_be_added_to_cells_that_ran(tmp_path: Path) -> None:
    config = {**CONFIG, "models": [{"name": "A"}, {"name": "B", "seeds": 1}], "data": [{"name": "x"}], "seeds": 3}
    jobs = [(job.spec["model"]["name"], job.spec["seed"]) for job in DadfBenchmarkJobGenerator(first_seed=1)(config)]
    assert jobs == [("A", 1), ("A", 2)]
    earlier = pd.DataFrame({
        "data": ["x", "x", "x"], "model": ["A", "A", "B"], "seed": [0, 1, 0], "image_AUROC": [0.1, 0.2, 0.3],
    })
    earlier.to_csv(tmp_path / "results.csv", index=False)
    added = pd.DataFrame({"data": ["x", "x"], "model": ["A", "A"], "seed": [1, 2], "image_AUROC": [0.7, 0.8]})
    rows = merged(added, tmp_path / "results.csv", config, first_seed=1)
    assert list(zip(rows["model"], rows["seed"], rows["image_AUROC"], strict=True)) == [
        ("A", 0, 0.1), ("A", 1, 0.7), ("A", 2, 0.8), ("B", 0, 0.3),
    ]


def test_rows_kept_by_a_partial_run_are_written_back_as_they_were(tmp_path: Path) -> None:
    earlier = "data,model,seed,test_s\nx,A,0,2.7749541309967753\n"  # pandas' fast parser reads ...776 back
    (tmp_path / "results.csv").write_text(earlier)
    rerun = pd.DataFrame({"data": ["x"], "model": ["B"], "seed": [0], "test_s": [1.5]})
    merged(rerun, tmp_path / "results.csv", CONFIG).to_csv(tmp_path / "results.csv", index=False)
    assert (tmp_path / "results.csv").read_text().splitlines()[:2] == earlier.splitlines()


def test_a_model_may_run_at_its_own_input_size() -> None:
    config = {**CONFIG, "input_size": [64, 64], "models": [{"name": "A", "input_size": [128, 128]}, {"name": "B"}],
              "seeds": 1, "data": [{"name": "x"}]}
    sizes = {job.spec["model"]["name"]: job.spec["input_size"] for job in DadfBenchmarkJobGenerator()(config)}
    assert sizes == {"A": [128, 128], "B": [64, 64]}
    assert input_sizes(config) == "Input [64, 64] for every model but A ([128, 128])"
    assert input_sizes({**config, "models": [{"name": "B"}]}) == "Input [64, 64] for every model"


def test_a_partial_run_replaces_only_its_cells_and_keeps_config_order(tmp_path: Path) -> None:
    earlier = pd.DataFrame({
        "data": ["x", "x", "y", "y", "y"], "model": ["A", "C", "A", "C", "C"], "seed": [0, 0, 0, 0, 1],
        "image_AUROC": [0.1, 0.2, 0.3, 0.4, 0.5],
    })
    earlier.to_csv(tmp_path / "results.csv", index=False)
    rerun = pd.DataFrame({"data": ["y", "x"], "model": ["C", "B"], "seed": [0, 0], "image_AUROC": [0.9, 0.8]})
    rows = merged(rerun, tmp_path / "results.csv", CONFIG)
    assert list(zip(rows["data"], rows["model"], rows["image_AUROC"], strict=True)) == [
        ("x", "A", 0.1), ("x", "B", 0.8), ("x", "C", 0.2), ("y", "A", 0.3), ("y", "C", 0.9),
    ]


def test_ranking_averages_metrics_then_data_sets() -> None:
    results = pd.DataFrame({
        "data": ["x", "x", "x", "y", "y"], "model": ["A", "A", "B", "A", "B"], "seed": [0, 1, 0, 0, 0],
        "image_AUROC": [0.6, 0.8, 0.9, 0.5, 0.4], "pixel_AUROC": [0.9, 0.9, 0.9, 0.7, 1.0],
    })
    # A: x (0.7 + 0.9) / 2 = 0.8, y 0.6 -> 0.7; B: x 0.9, y 0.7 -> 0.8
    assert ranking(summarise(results), ["image_AUROC", "pixel_AUROC"]).splitlines()[2:] == [
        "| 1 | B | 0.8000 |", "| 2 | A | 0.7000 |",
    ]


def test_ranking_leaves_out_a_model_not_yet_run_on_every_data_set() -> None:
    results = pd.DataFrame({
        "data": ["x", "x", "y", "x", "y"], "model": ["A", "B", "A", "C", "C"], "seed": [0, 0, 0, 0, 0],
        "image_AUROC": [0.7, 0.99, 0.9, 0.6, 0.6],
    })
    assert ranking(summarise(results), ["image_AUROC"]).splitlines()[2:] == [
        "| 1 | A | 0.8000 |", "| 2 | C | 0.6000 |", "| none | B (on 1 of 2 data sets, not ranked) | 0.9900 |",
    ]


def test_ranking_puts_the_lowest_first_for_metrics_where_lower_is_better() -> None:
    results = pd.DataFrame({
        "data": ["x", "x", "y", "y"], "model": ["A", "B", "A", "B"], "seed": [0, 0, 0, 0],
        "held_out_flow_nll": [-0.5, -0.9, -0.7, -0.6], "image_AUROC": [0.9, 0.8, 0.7, 0.6],
    })
    assert ranking(summarise(results), ["held_out_flow_nll"]).splitlines()[2:] == [
        "| 1 | B | -0.7500 |", "| 2 | A | -0.6000 |",
    ]
    with pytest.raises(ValueError, match="better when lower"):
        ranking(summarise(results), ["held_out_flow_nll", "image_AUROC"])


def fit_only_dadf(root: Path, **arguments: object) -> dict:
    """The benchmark's row of a tiny DADF fitted (not tested) on the generated data set."""
    spec = next(DadfBenchmarkJobGenerator().generate_jobs({
        "models": [{"name": "DADF", "class_path": "anomalib_dadf.Dadf", "init_args": {**TINY_MODEL, **arguments}}],
        "data": [{
            "name": "toy",
            "class_path": "anomalib_dadf.data.MVTec",
            "init_args": {"root": str(root), "category": "widget", "num_workers": 0, "train_batch_size": 4},
        }],
        "input_size": [64, 64],
        "fit_only": True,
    })).spec
    return measure(spec)


def test_a_fit_only_run_tests_nothing_and_keeps_the_held_out_nll(mvtec_root: Path) -> None:
    row = fit_only_dadf(mvtec_root, reconstruction_epochs=1, flow_epochs=2)
    assert row["epochs"] == 3
    assert row["held_out_flow_nll"] == pytest.approx(row["held_out_flow_nll"]), "a number, not NaN"
    assert not {"image_AUROC", "test_s", "ms_per_image"} & set(row)
    assert "epochs_per_flow" not in row, "only a stop per flow trains its flows for different lengths"


def test_a_row_says_how_long_each_flow_trained_under_a_stop_per_flow(mvtec_root: Path) -> None:
    # Flows that cannot learn (learning rate 0) never improve: each stops after its second epoch.
    row = fit_only_dadf(
        mvtec_root, flow_inputs=["prior"], flow_epochs=5, flow_patience=1, flow_lr=0.0, flow_stop="per_flow",
    )
    assert (row["epochs"], row["epochs_per_flow"]) == (2, "2 2 2")


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "configs").glob("*.yaml")
                                        if "models" in yaml.safe_load(path.read_text())))
def test_committed_benchmark_configs_name_real_classes_and_arguments(name: str) -> None:
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    assert config["models"] and config["data"]
    for entry in config["models"] + config["data"]:
        signature = inspect.signature(import_class(entry["class_path"]))
        signature.bind_partial(**entry.get("init_args", {}))  # raises on an argument the class does not take


KILLED_HARNESS = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from anomalib_dadf.benchmark.job import exit_with_parent
if __name__ == "__main__":
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent)
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 300)
    time.sleep(300)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_a_fit_stops_when_the_harness_is_killed() -> None:
    harness = subprocess.Popen([sys.executable, "-c", KILLED_HARNESS], stdout=subprocess.PIPE, text=True)
    worker = int(harness.stdout.readline())
    harness.kill()
    harness.wait()

    def running() -> bool:
        try:
            return Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(), "the worker outlived the harness"
