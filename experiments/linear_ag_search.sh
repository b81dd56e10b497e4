#!/bin/sh
# sh experiments/linear_ag_search.sh
#
# LinearAG in the search at 30 of 50 NFE: the affine coefficients fixed from the shipped fit
# (search_spaces/linear_ag.yaml) or trained jointly with the gates (linear_ag_train.yaml), each for
# 16 steps of 32 pairs and one round of polish (about 2 minutes each on 2 CPU cores), then both
# policies beside the searched cfg_scales policy and its LinearAG upgrade on 1000 held-out samples
# (seed 1) in one `agsearch eval`.
set -e
mkdir -p results/linear_ag/policies
for space in linear_ag linear_ag_train; do
  agsearch search --model.space=$space --model.budget=30 --trainer.max_steps=16 --model.polish_rounds=1 --model.polish_from=both \
    --eval.samples=0 --wandb.mode=disabled --progress=false --trainer.default_root_dir=runs/linear_ag \
    --out=results/linear_ag/policies/$space-b30.json
done
agsearch baseline linear-ag --from results/search/policies/cfg_scales-b30.json \
  --out results/linear_ag/policies/linear-ag-cfg_scales-b30.json
agsearch eval --policy results/linear_ag/policies/linear_ag-b30.json \
  --policy results/linear_ag/policies/linear_ag_train-b30.json \
  --policy results/search/policies/cfg_scales-b30.json \
  --policy results/linear_ag/policies/linear-ag-cfg_scales-b30.json \
  --samples 1000 --seed 1 --no-progress --markdown --json results/linear_ag/eval_search_b30.json \
  | tee results/linear_ag/eval_search_b30.md
