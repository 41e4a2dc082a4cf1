"""Gradio widget of the metric's Hub Space (run by the Space, not by the SLIMP code or tests)."""

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("isic2024_pauc.py")
launch_gradio_widget(module)
