"""Train one embedded-model stage: the child process :mod:`effllm_helpers.models.embedded` starts.

The recipes (which preset, how many steps, which task) live with the model names in
``models/embedded.py``; the training is the study axes' own code, so it lives on the axis floor
and ``models/`` never imports ``axes/``.
"""

from __future__ import annotations

from pathlib import Path

from ..models.embedded import BASE_STEPS, STAGES, _arch_params, _sft_params


def pretrain(profile: str, out: Path, progress: bool) -> None:
    """Stage ``base``: axis 1 pretrains the GQA + RoPE model and saves it into ``out``."""
    from . import architecture

    architecture.run(_arch_params(profile), seed=0, save_dir=out, progress=progress)


def finetune(base: Path, profile: str, out: Path, progress: bool) -> None:
    """Stage ``sft``: axis 2 fully fine-tunes ``base`` on the arithmetic suite into ``out``."""
    from . import finetuning

    finetuning.run(_sft_params(base, profile), seed=0, save_dir=out, progress=progress,
                   evaluate_tasks=False)


def main(argv: list[str] | None = None) -> int:
    """Child entry point of ``models.embedded._build_in_child`` (internal)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m effllm_helpers.axes.build_embedded",
                                 description="internal: train one embedded-model stage into OUT")
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("profile", choices=list(BASE_STEPS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--base", type=Path, default=None, help="the base stage's folder (sft only)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.stage == "base":
        pretrain(args.profile, args.out, args.progress)
    else:
        if args.base is None:
            ap.error("the sft stage needs --base")
        finetune(args.base, args.profile, args.out, args.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
