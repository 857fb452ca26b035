"""What a run leaves behind and every later step reads: the saved model format (weights, the
preprocessing contract, the rebuild recipe), the contract inside ONNX files, the predictors of a
saved model, and the run folder's layout (:mod:`raykd.artifact.rundir`).

It sits below training, export, serving and the search, so none of them imports another to read
a model.
"""
