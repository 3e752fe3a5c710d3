"""Each helper has one home: the error hierarchy, the parameter count, the optimizer, eval loss."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

from effllm_helpers.errors import DivergedError, SkipRun, UnsupportedTechnique, check_finite

PKG = Path(__file__).resolve().parents[1] / "effllm_helpers"


def test_unsupported_technique_is_a_skip_so_axes_need_not_translate() -> None:
    assert issubclass(UnsupportedTechnique, SkipRun)
    assert not issubclass(UnsupportedTechnique, ValueError)


def test_an_untranslated_unsupported_technique_is_classified_as_a_skip() -> None:
    from effllm_helpers.run import classify_failure

    assert classify_failure("UnsupportedTechnique", "no 4-bit kernel") == "skipped"


def test_check_finite_raises_diverged_on_nan() -> None:
    check_finite(1.5, 0)
    try:
        check_finite(float("nan"), 3)
    except DivergedError as exc:
        assert "step 3" in str(exc)
    else:
        raise AssertionError("nan loss passed")


def test_train_does_not_import_the_notebook_side_run_module() -> None:
    tree = ast.parse((PKG / "train.py").read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "run" not in names and "effllm_helpers.run" not in names


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' packed 4-bit parameter (two values per uint8 byte)."""


def test_count_params_unpacks_4bit_weights() -> None:
    from effllm_helpers.models import count_params

    model = nn.Module()
    model.w = Params4bit(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    model.b = nn.Parameter(torch.zeros(3))
    counts = count_params(model)
    assert counts["total"] == 8 * 2 + 3
    assert counts["trainable"] == 3


def _defined(name: str) -> list[str]:
    """Modules of the package that define a function ``name``."""
    return sorted(str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
                  if any(isinstance(n, ast.FunctionDef) and n.name == name
                         for n in ast.walk(ast.parse(f.read_text()))))


def test_each_helper_is_defined_once_in_its_home() -> None:
    assert _defined("count_params") == ["models/zoo.py"]
    assert _defined("eval_loss") == ["evaluate.py"]
    assert _defined("_adamw") == [] and _defined("default_optimizer") == []
    assert _defined("_bnb4_config") == [] and _defined("bnb4_config") == ["techniques/precision.py"]


def test_optimizer_betas_pretrain_vs_finetune() -> None:
    from effllm_helpers.train import FINETUNE_BETAS, PRETRAIN_BETAS, adamw

    lin = nn.Linear(4, 4)
    pre = adamw(lin, 1e-3, 0.1, torch.device("cpu"))
    fine = adamw(lin, 1e-3, 0.1, torch.device("cpu"), betas=FINETUNE_BETAS)
    assert pre.param_groups[0]["betas"] == PRETRAIN_BETAS == (0.9, 0.95)
    assert fine.param_groups[0]["betas"] == (0.9, 0.999)
    assert [g["weight_decay"] for g in pre.param_groups] == [0.1, 0.0]  # matrix, then bias


def _dtype_maps(source: str) -> list[int]:
    """Lines of dict literals pairing a short dtype name with a torch dtype (a dtype map)."""
    from effllm_helpers import catalog

    names, attrs = set(catalog.DTYPES), set(catalog.DTYPES.values())
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Dict):
            continue
        items = [n for n in (*node.keys, *node.values) if n is not None]
        if any(isinstance(n, ast.Attribute) and n.attr in attrs for n in items) and any(
                isinstance(n, ast.Constant) and n.value in names for n in items):
            out.append(node.lineno)
    return out


def test_one_dtype_map_in_the_catalog() -> None:
    assert _dtype_maps('M = {"bf16": torch.bfloat16}') == [1]
    found = {str(f.relative_to(PKG)): lines for f in PKG.rglob("*.py")
             if (lines := _dtype_maps(f.read_text()))}
    assert found == {}  # catalog.DTYPES is the map; torch_dtype / dtype_name read it


def test_dtype_names_round_trip_through_the_catalog() -> None:
    from effllm_helpers import catalog

    assert catalog.torch_dtype("bf16") is torch.bfloat16
    assert catalog.dtype_name(torch.float16) == "fp16"
    assert catalog.dtype_name(torch.int8, "fp32") == "fp32"


def test_the_meter_reads_its_units_from_the_catalog() -> None:
    from effllm_helpers import catalog
    from effllm_helpers.measure import meter

    assert set(meter.UNITS) == {*meter.METRIC_KEYS, *meter.GPU_KEYS}
    assert all(meter.UNITS[k] == catalog.METRICS[k].unit is not None for k in meter.UNITS)


def test_an_unknown_metric_has_no_guessed_direction() -> None:
    import pytest

    from effllm_helpers.report import scoring

    with pytest.raises(KeyError, match=r"'made_up_metric'; known: .*amu_gb"):
        scoring.higher_is_better("made_up_metric")
    guesses = [str(f.relative_to(PKG)) for f in PKG.rglob("*.py")
               if "HIGHER_IS_BETTER.get(" in f.read_text()]
    assert guesses == []
