"""README's python blocks run as written, top to bottom, in one namespace."""

import pathlib
import re
import warnings


def test_readme_python_blocks_run_in_order():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a rule for lm_head on a model with tied embeddings
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
