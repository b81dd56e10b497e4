#!/bin/sh
# sh experiments/linear_ag_search.sh
#
# LinearAG in the search at 30 of 50 NFE: the affine coefficients fixed from the shipped fit
# (search_spaces/linear_ag.yaml) or trained jointly with the gates (linear_ag_train.yaml). Settings
# are far smaller than the default search (32 pairs, batch 16, 10 steps, no polish; affine_lr 0.01
# so that 10 steps can move the trained coefficients) so both runs
# fit a heavily shared 2-core CPU; the policies land in results/linear_ag/policies/.
set -e
for space in linear_ag linear_ag_train; do
  agsearch search --model.space=$space --model.budget=30 --data.num_pairs=32 --data.batch_size=16 \
    --data.num_val=16 --trainer.max_steps=10 --model.polish_rounds=0 --model.affine_lr=0.01 --eval.samples=0 \
    --wandb.mode=disabled --progress=false --trainer.default_root_dir=runs/linear_ag \
    --out=results/linear_ag/policies/$space-b30.json
done
