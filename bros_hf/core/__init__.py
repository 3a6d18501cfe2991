"""The method, without Hugging Face: torch only.

- :mod:`~bros_hf.core.sketch`: seeded random sketches P, Q, U and r-dim coordinates ↔ full tensors.
- :mod:`~bros_hf.core.estimators`: lower gradient, Hessian action and cross term in subspaces
  (double backward or finite differences), pure functions on dicts of tensors.
- :mod:`~bros_hf.core.lowrank`: θ + P a inside ``nn.Linear`` / ``nn.Embedding`` layers, without
  full-size copies.
- :mod:`~bros_hf.core.upper`: the upper-level variables λ (domain mixture, example weights) and
  their moving-average update.
- :mod:`~bros_hf.core.engine`: one BROS / MA-SOBA step (terms, then updates) and its state.
"""
