"""What C2LIP is compared with, and the options the study tried that are not the paper.

negatives.py   rule-made hard negatives for the NegCLIP-style baseline (train.py --method negclip)
losses.py      the baselines' losses (SigLIP's alone, CLIP's softmax, NegCLIP's) and the concept label
               rules other than the paper's owner rule (train.py --concept-labels phrase | scene)
objectives.py  what replaces train.py's `embed` and `loss_of` for a baseline or a study option, and the model
               with the concept losses' own logit pair (--concept-logits own)
"""
