"""Tasks: what a target is and what training, evaluation and valuation do with it
(`mmval.tasks.base`). A recipe's `task` names one; unset, it is the data set's own."""

from __future__ import annotations

from typing import Annotated

from mmval.errors import UserError
from mmval.registry import Tagged
from mmval.tasks.base import Outcome, Task, TaskConfig
from mmval.tasks.classification import Classification
from mmval.tasks.localisation import Localisation
from mmval.tasks.regression import Regression
from mmval.tasks.segmentation import Segmentation

TASKS: dict[str, type[Task]] = {
    task.kind: task for task in (Classification, Regression, Localisation, Segmentation)
}

TaskField = Annotated[
    TaskConfig, Tagged(lambda: {name: task.Config for name, task in TASKS.items()}, shorthand=True)
]


def resolve_task(config: TaskConfig | None, data_task: str, num_classes: int) -> Task:
    """The task a recipe trains for on data labelled for `data_task`: its own when it names
    one, else the data's. Classification is possible on any data (every sample has a class);
    another task needs data labelled for it."""
    name = data_task if config is None else config.name
    if name not in ("classification", data_task):
        raise UserError(
            f"task: {name} needs data labelled for {name}, and this data set is labelled for "
            f"{data_task}; leave task unset (the data's task) or set task: classification."
        )
    task = TASKS[name]
    return task(config if config is not None else task.Config(), num_classes)


CLASSIFICATION = Classification(Classification.Config(), 0)

__all__ = ["CLASSIFICATION", "TASKS", "Outcome", "Task", "TaskConfig", "TaskField", "resolve_task"]
