"""Each lever of the recipe, measured: one stage (default: the hand-set cnn, search off) trained as the pipeline
trains it, once with the defaults and once per lever changed (one run per argument), on the repository's data/split
(run `dvc repro split` first; cnn_aug starts from the repository's models/cnn). Choices are read on the validation
split; the test accuracy is printed as the stage writes it, never used to choose. Prints a markdown
table for docs/decisions.md.

    python bench/levers.py                                        # the default levers, about 4 min each on 2 cores
    python bench/levers.py cnn.train.ema=true "cnn.arch=plain cnn.dense_units=128"   # one run per argument
    python bench/levers.py --stage cnn_aug cnn_aug.train.epochs=12
"""

from __future__ import annotations

import argparse

from run_pipeline import hand_set_cnn, stage_alone

LEVERS = ("cnn.train.label_smoothing=0.0", "cnn.train.warmup=0.0", "cnn.train.ema=true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=LEVERS,
                        help="one run per argument, its overrides separated by spaces (default: %(default)s)")
    parser.add_argument("--stage", default="cnn", help="the stage to train (default: %(default)s, its search off)")
    args = parser.parse_args()
    train = hand_set_cnn if args.stage == "cnn" else lambda *overrides: stage_alone(args.stage, *overrides)
    rows = [("defaults", train())] + [(run, train(*run.split())) for run in args.runs]
    print("| run | val accuracy | with flip TTA | test accuracy | fit s | epochs |\n|---|---|---|---|---|---|")
    for name, m in rows:
        tta = m.get("val_accuracy_tta")
        print(f"| {name} | {m['val_accuracy']:.4f} | {'' if tta is None else f'{tta:.4f}'} | "
              f"{m['test']['accuracy']:.4f} | {m['fit_seconds']:.0f} | {m['epochs']} |")


if __name__ == "__main__":
    main()
