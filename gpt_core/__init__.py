"""gpt_core: a GPT-2-class language model and everything needed to train and use it.

Plain PyTorch: no orchestration or tracking imports, so it works from a notebook, a script or
torchrun as well as from the Prefect flows.
"""
