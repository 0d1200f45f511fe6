"""The device side of a SecAgg+ round: Flower's `secaggplus_mod` masks what fedrec's train
handler returns.

The mod speaks the legacy format (FitIns in, FitRes out), so a secure round's message is
recognized by its SecAgg+ config record and answered with a FitRes whose parameters are
the dense statistics (fedrec.privacy.secagg.secure_order). Plain rounds pass by untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedrec.privacy.secagg import COUNT, secure_order
from fedrec.run import schema

FITINS_CONFIG, FITINS_PARAMETERS = "fitins.config", "fitins.parameters"  # the legacy format's FitIns records


def secure_train_mod(msg: Message, context: Context, call_next) -> Message:
    """Run SecAgg+ on messages of the protocol; let plain train messages through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_round(msg: Message) -> bool:
    return FITINS_CONFIG in msg.content.config_records


def secure_reply(msg: Message, train: Callable) -> Message:
    """Train on the FitIns' model and reply with the dense update for the mod to mask."""
    # Read the FitIns records directly: compat's FitIns conversion refuses list values (the users).
    parameters = compat.arrayrecord_to_parameters(msg.content.array_records[FITINS_PARAMETERS], keep_input=True)
    config = msg.content.config_records[FITINS_CONFIG]
    shared = dict(zip(config[schema.SHARED_NAMES], parameters_to_ndarrays(parameters)))
    result, device = train(shared, config)
    if device.policy.update_mode != "dense":
        raise ValueError("secure aggregation sums dense uploads only")
    vector = dict(result.upload)  # the algorithm's statistics, in its order (fedrec.privacy.secagg.secure_order)
    vector[COUNT] = np.array([result.took_part.sum() * device.policy.clipping_norm], np.float64)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector[k] for k in secure_order(result.upload)]),
                    1, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
