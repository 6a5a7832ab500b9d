import warnings

# Megatron-Core warns about missing TE/apex and deprecated torch APIs on every import;
# test output stays readable without them (spawned ranks import this package first).
warnings.simplefilter("ignore")
