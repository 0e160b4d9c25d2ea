"""Measuring a trained model: the pixel-space evaluator, metrics, and promotion."""
