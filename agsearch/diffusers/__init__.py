"""The diffusers integration: run policies inside unmodified pipelines (:mod:`.hook`), a
modular-pipeline guider (:mod:`.guider`), ``agsearch generate`` (:mod:`.generate`), schedulers by
name (:mod:`.schedulers`) and the offline CLIP tokenizer (:mod:`.clip_tokenizer`)."""
