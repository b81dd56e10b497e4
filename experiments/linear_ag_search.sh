#!/bin/sh
# sh experiments/linear_ag_search.sh
#
# LinearAG in the search at 30 of 50 NFE: the affine coefficients fixed from the shipped fit
# (search_spaces/linear_ag.yaml) or trained jointly with the gates (linear_ag_train.yaml). Settings
# are smaller than the default search (128 pairs, batch 16, 24 steps, one polish round) so both
# runs fit a shared 2-core CPU; the policies land in results/linear_ag/policies/.
set -e
for space in linear_ag linear_ag_train; do
  agsearch search --model.space=$space --model.budget=30 --data.num_pairs=128 --data.batch_size=16 \
    --data.num_val=32 --trainer.max_steps=24 --model.polish_rounds=1 --eval.samples=0 \
    --wandb.mode=disabled --progress=false --trainer.default_root_dir=runs/linear_ag \
    --out=results/linear_ag/policies/$space-b30.json
done
