"""The training engine: one loop, written as a generator of events, that the command line
prints, the app streams into live plots, and `torchrun` runs on several processes.

    for event in train(model, train_data, val_data, RECIPES["small-data"], out_dir="runs/x"):
        print(event)

Closing the generator (or `should_stop()` returning True) stops between two optimiser steps;
the model then holds the weights of the last completed step and the last epoch's checkpoint
on disk is intact. Every epoch draws its shuffling, augmentation and dropout randomness from
`seed`, the epoch number and the process's rank alone, so a resumed run continues exactly the
same curve.

    recipes.py     Recipe, RECIPES, make_optimizer, warmup_cosine
    loop.py        train: set up, resume, and per epoch train, validate, save
    run.py         Run, what one call of train works with, and set_up, which builds it
    batches.py     an epoch's random streams; augmentation ahead of the step
    state.py       the files in out_dir: checkpoints and train_state.pt, and resuming from them
    budget.py      a time budget instead of an epoch count: the pace measured, the epochs chosen
    events.py      what train yields (PlanEvent, StepEvent, ValidationEvent, EpochEvent, DoneEvent), TrainingError
    evaluation.py  evaluate, extract_features
    average.py     WeightAverage, the moving average of the weights
    teacher.py     train_teacher: the CNN teacher a student distils from (vitdemo.teacher)
    devices.py     select_device, resolve_precision, the processes of a distributed run
"""

from .average import WeightAverage
from .batches import AUGMENT_AHEAD
from .devices import PRECISIONS, resolve_precision, select_device
from .evaluation import Features, evaluate, extract_features
from .budget import BudgetPlan
from .events import DoneEvent, EpochEvent, PlanEvent, StepEvent, TrainingError, ValidationEvent
from .loop import train
from .recipes import RECIPES, Recipe, make_optimizer, warmup_cosine
from .run import COMPILE_MODES
from .state import EMA_DIR, STATE_NAME
from .teacher import train_teacher

__all__ = [
    "AUGMENT_AHEAD", "BudgetPlan", "COMPILE_MODES", "EMA_DIR", "PRECISIONS", "RECIPES", "STATE_NAME", "DoneEvent",
    "EpochEvent", "Features", "PlanEvent", "Recipe", "StepEvent", "TrainingError", "ValidationEvent", "WeightAverage",
    "evaluate", "extract_features", "make_optimizer", "resolve_precision", "select_device", "train", "train_teacher",
    "warmup_cosine",
]
