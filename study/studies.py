"""The studies that study/sweep.py runs: each a protocol (pretraining and fine-tuning flags), its rows and its columns.

  hypotheses   docs/study.md, "When does concept-centric learning help?": seven explanations of C2LIP's
               gap to the SigLIP baseline, one row each (the default study)
  mechanism    docs/mechanism.md, "The mechanism, measured": C2LIP fine-tuned in the threshold regime of
               released SigLIP weights (t = 100), with labels from the scene, and phrase binding read
               through the global embedding and through the pooling

A row is (train.py flags added to the study's fine-tuning flags, what the row tests); the row
"pretrained" (flags None) is the starting point itself, not fine-tuned. Every other row of a seed starts
from that seed's pretrained model and is compared with the baseline row of the same seed.
"""

from dataclasses import dataclass

from evaluation.shapes_benchmark import CATEGORIES


@dataclass(frozen=True)
class Study:
    pretrain: list[str]  # train.py flags of the pretraining; --steps, --batch-size and --seed are added
    finetune: list[str]  # train.py flags every fine-tune shares; the row's flags are added
    rows: dict[str, tuple[list[str] | None, str]]
    columns: list[str]  # the benchmark's metrics shown in the tables (every metric is kept in results.json)
    diagnostics: list[str]  # sweep.diagnostics() names shown in the third table
    root: str = "runs/sweep"  # default folder of the runs
    pretrain_steps: int = 400
    finetune_steps: int = 100
    batch_size: int = 128
    pooled_tau: float | None = None  # also score every run through the pooling at this tau (pooled/...)
    pretrain_seed: int | None = None  # every seed fine-tunes this seed's pretrained model (None: its own)
    baseline: str = "siglip"


HYPOTHESES = Study(
    # The logit scale and bias learn at their own rate (--logit-lr) in every run, pretraining included: at
    # the shared rate they barely move from t = 10, b = -10 in a few hundred steps.
    pretrain=["--method", "siglip", "--logit-lr", "0.05", "--holdout-combos"],
    finetune=["--lr", "1e-4", "--logit-lr", "0.05", "--holdout-combos"],
    rows={
        "pretrained": (None, "the pretrained SigLIP model every row starts from, not fine-tuned"),
        "siglip": (["--method", "siglip"], "the baseline: fine-tuned with the caption loss alone"),
        "negclip": (["--method", "negclip"], "NegCLIP-style: plus one rule-made hard negative per caption"),
        "c2lip": (["--method", "c2lip"], "C2LIP with the paper's weights: L_npc 1.0, L_xac 0.01, tau 1"),
        "c2lip -npc": (["--method", "c2lip", "--npc-weight", "0"], "ablation: without the concept loss L_npc"),
        "c2lip -xac": (["--method", "c2lip", "--xac-weight", "0"], "ablation: without the pooled concept loss L_xac"),
        "c2lip xac 1": (
            ["--method", "c2lip", "--xac-weight", "1"],
            "L_xac weighted as much as L_npc",
        ),
        "c2lip tau 0.1": (["--method", "c2lip", "--tau", "0.1"], "hypothesis 5: a sharper pooling"),
        "c2lip xac 1 tau 0.1": (
            ["--method", "c2lip", "--xac-weight", "1", "--tau", "0.1"],
            "hypothesis 5: a sharper pooling that carries weight",
        ),
        "c2lip own t,b": (
            ["--method", "c2lip", "--concept-logits", "own"],
            "hypothesis 2: the concept losses get their own logit scale and bias",
        ),
        "c2lip npc 0.1": (
            ["--method", "c2lip", "--npc-weight", "0.1"],
            "hypothesis 2: a lighter concept loss",
        ),
        "c2lip phrase labels": (
            ["--method", "c2lip", "--concept-labels", "phrase"],
            "hypothesis 3: a duplicate phrase in the batch is a positive, not a negative",
        ),
    },
    # eval.py's shapes metrics, compositional categories first
    columns=[*CATEGORIES, "i2t-R@1", "t2i-R@1", "zeroshot-top1"],
    diagnostics=["swap-text-cos", "L_sig", "L_npc", "L_xac", "t", "b", "concept t", "concept b"],
)

MECHANISM = Study(
    # Pretraining as above (batch 64, to fit the study on a 2-core CPU). Fine-tuning restarts t at 100,
    # the regime of released SigLIP weights (t ~ 112), with b refitted midway between matching and other
    # captions' logits on the first batch (--init-bias auto), and leaves t and b at the shared learning
    # rate: they stay where they start (docs/mechanism.md).
    pretrain=["--method", "siglip", "--logit-lr", "0.05", "--holdout-combos"],
    finetune=["--lr", "1e-4", "--holdout-combos", "--init-scale", "100"],
    rows={
        "pretrained": (None, "the pretrained SigLIP model every row starts from (its own t), not fine-tuned"),
        "siglip": (["--method", "siglip"], "the baseline, fine-tuned at t = 100 with the caption loss alone"),
        "c2lip": (["--method", "c2lip"], "question 1: C2LIP (paper's weights) where positives can clear the threshold"),
        "c2lip scene": (
            ["--method", "c2lip", "--concept-labels", "scene"],
            "question 2: the same with labels from the scene, no false negatives",
        ),
        "c2lip xac 1 tau 0.1": (
            ["--method", "c2lip", "--xac-weight", "1", "--tau", "0.1"],
            "question 3: the pooled loss that carries weight, read plain and through the pooling",
        ),
    },
    columns=[
        "swap-att",
        "swap-obj",
        "replace-obj",
        "phrase-att",
        "pooled/phrase-att",
        "pooled/swap-att",
        "i2t-R@1",
        "t2i-R@1",
        "zeroshot-top1",
    ],
    diagnostics=[
        "swap-text-cos",
        "above/caption",
        "above/phrase",
        "pos/phrase",
        "fn/phrase",
        "L_sig",
        "L_npc",
        "L_xac",
        "t",
        "b",
    ],
    root="runs/mechanism",
    pretrain_steps=400,
    finetune_steps=100,
    batch_size=64,
    pooled_tau=0.1,
    # One pretrained model (seed 0) for every seed: the seeds then differ in their fine-tuning scenes only,
    # and the study fits on a shared 2-core CPU (docs/mechanism.md says what this leaves out).
    pretrain_seed=0,
)

STUDIES = {"hypotheses": HYPOTHESES, "mechanism": MECHANISM}
