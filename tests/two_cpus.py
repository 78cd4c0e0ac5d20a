"""Runs a test script under MirroredStrategy on two logical CPU devices, in a subprocess.

Logical devices must be configured before TensorFlow initializes, which the
test process has already done; so the script runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

_PREAMBLE = """\
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
import tfprune
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
"""


def run_on_two_cpus(body, timeout=240):
    """Runs ``body`` (with ``tf``, ``keras``, ``np``, ``tfprune``, ``strategy`` defined).

    Returns:
        The `subprocess.CompletedProcess` (text stdout/stderr).
    """
    script = _PREAMBLE + textwrap.dedent(body)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout, env=env)
