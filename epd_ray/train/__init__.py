"""Ray Train: worker loops (`pretrain`, `gan`) and the drivers that fit them (`run`)."""
