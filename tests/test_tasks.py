"""modernbert_ane/tasks.py: the task records agree with transformers, model.py and the package layout, and
the module stays torch-free."""
import subprocess
import sys

import pytest
import transformers

from modernbert_ane.model import ModernBert, ModernBertConfig
from modernbert_ane import tasks


def test_views_are_derived_from_the_records():
    assert tasks.TASKS == tuple(tasks.SPECS)
    assert set(tasks.POOLED_TASKS) == {n for n, t in tasks.SPECS.items() if t.pooled}
    assert set(tasks.COSINE_TASKS) | {n for n, t in tasks.SPECS.items() if t.compared_by == "kl"} == set(tasks.TASKS)
    assert all(tasks.SPECS[task].output == name for task, name in tasks.OUTPUT_NAMES.items())
    assert all(arch in tasks.SPECS[task].architectures for arch, task in tasks.ARCHITECTURE_TASKS.items())


@pytest.mark.parametrize("name", tasks.TASKS)
def test_every_task_has_a_transformers_class_a_function_name_and_a_model(name):
    task = tasks.SPECS[name]
    assert hasattr(transformers, task.hf_class), task.hf_class
    assert task.function.isidentifier() and "-" not in task.function
    assert task.compared_by in ("kl", "cosine")
    for arch in task.architectures:                         # a checkpoint of that class defaults to this task
        assert arch == task.hf_class
    config = ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=2, num_labels=3, layer_types=("full_attention",))
    ModernBert(config, task=name)                           # model.py builds a head for every task


def test_function_names_are_distinct():
    functions = [t.function for t in tasks.SPECS.values()]
    assert len(set(functions)) == len(functions)


def test_tasks_module_is_torch_free():
    code = "import sys, modernbert_ane.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
