"""Zero-shot evaluation on the benchmarks papers report (VQAv2, OK-VQA, GQA, COCO captions, NoCaps,
ScienceQA) from their official files, with their official metrics: `python -m vlfast.evaluate`,
and the per-epoch scores of `python -m vlfast.transfer --eval-task`."""
from vlfast.evaluate.tasks import TASKS, Task, get_task, load_benchmark

__all__ = ["TASKS", "Task", "get_task", "load_benchmark"]
