"""The iteration line is Megatron's, character for character (the format docs/design.md quotes)."""

from mm_omni.training.metrics import iteration_line, summary_line

DESIGN_LINE = (" iteration       10/     100 | consumed samples: 80 | elapsed time per iteration (ms): 812.3 | "
               "learning rate: 1.000000E-05 | global batch size: 8 | lm loss: 1.234567E+00 | grad norm: 1.234 | "
               "tokens per sec per device: 4012.5 |")


def test_iteration_line_matches_design():
    line = iteration_line(10, 100, 80, 812.3, 1e-5, 8, {"lm loss": 1.234567}, 1.234, 4012.5)
    assert line == DESIGN_LINE


def test_iteration_line_without_tps_and_with_loss_scale():
    line = iteration_line(1, 2, 8, 5.0, 1e-5, 8, {"lm loss": 2.0}, 0.5, None, loss_scale=65536.0)
    assert line.endswith("| lm loss: 2.000000E+00 | loss scale: 65536.0 | grad norm: 0.500 |")


def test_summary_line():
    assert summary_line(10, 2.0, 4000, 2).startswith("training done: 10 iterations in 2.0 s | tokens per sec: 2000.0 "
                                                      "| tokens per sec per device: 1000.0 | peak memory")


def test_iteration_line_with_mfu_and_summary_with_flops():
    line = iteration_line(1, 2, 8, 5.0, 1e-5, 8, {"lm loss": 2.0}, 0.5, 100.0, tflops_per_device=123.45, mfu=0.2512)
    assert line.endswith("| tokens per sec per device: 100.0 | model TFLOP/s per device: 123.5 | MFU: 25.1% |")
    done = summary_line(10, 2.0, 4000, 2, flops=4e14, peak_tflops=400.0)
    assert "| model TFLOP/s per device: 100.0 | MFU: 25.0% |" in done
