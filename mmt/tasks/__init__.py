"""Tasks: what each model trains on and how (losses, streams, phases), and the contract
(`mmt.tasks.base`) the one trainer calls. Tasks import models, tokenizers, losses and
sampling; they never import `mmt.training`.
"""
