"""Validation metrics: balanced multi-class accuracy first, then the rest; cancer-vs-benign view;
confusion matrix and report files. Plain torch + torchmetrics + numpy, no Ray."""
