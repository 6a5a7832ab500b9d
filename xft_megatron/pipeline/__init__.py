"""One typed XFT pipeline (xft.py builds its steps from a PipelineSpec; steps.py the kinds of
step; completion.py the one skip-if-done scheme), shared by `xft quickstart` and the
deepseek-coder recipe (recipe.py, launched by examples/deepseek_coder_1.3b_xft/run.sh)."""
