"""Model families behind one interface: latent diffusion on images, ChiroDiff on pen strokes."""

from .base import Samples, Task, TrainData, make_task, to_uint8

__all__ = ["Samples", "Task", "TrainData", "make_task", "to_uint8"]
