"""Distributed training strategies a stage can run under (DeepSpeed ZeRO; DDP lives in the stage context)."""
