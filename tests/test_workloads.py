"""The workload flags (lk_vllm.bench.workloads) that eval and bench share."""

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.unit
def test_eval_and_bench_take_the_same_workload_flags():
    import argparse

    from lk_vllm.bench import command as bench
    from training import evaluate

    def actions(module):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return {
            action.dest: (action.option_strings, action.default, action.help) for action in parser._actions
        }

    shared = {"dataset", "limit", "chat_template", "num_speculative_tokens", "max_tokens", "target"}
    eval_flags, bench_flags = actions(evaluate), actions(bench)
    assert shared <= eval_flags.keys() and shared <= bench_flags.keys()
    for dest in shared - {"target"}:  # --target says what each command defaults to
        assert eval_flags[dest] == bench_flags[dest], dest
