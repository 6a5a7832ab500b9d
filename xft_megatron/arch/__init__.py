"""What a model is, as plain data (no torch): the tensor names (`names`), the parameter and FLOP
counts (`counts`) and the model families (`families`). The bottom of the package above
`errors`: everything else may read it, it reads nothing of theirs."""
