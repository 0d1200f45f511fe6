"""The message schema shared by ClientApp and ServerApp: the only thing they share.

What crosses the network is exactly this: the algorithm's shared arrays (server to device), its
named statistics (device to server; fedrec.models.algorithm.Algorithm.statistics, plus ITEM_INDEX in
the sparse and padded upload modes), the device's part of the config (fedrec.run.device_config) with
the round's keys, and sums. User vectors, user biases, ratings and user ids never appear in a reply.
"""

from fedrec.models.metrics import METRIC_PREFIXES, SUM_KEYS
from fedrec.privacy.upload import ITEM_INDEX as ITEM_INDEX  # part of the schema: the index of sparse uploads

ARRAYS = "arrays"  # ArrayRecord key, Flower's convention
CONFIG = "config"  # ConfigRecord key
METRICS = "metrics"  # MetricRecord key

WEIGHT = "num-users"  # weight of a reply: users whose updates it sums
TRAIN_METRICS = (WEIGHT, "loss-sum", "num-rows")  # under local DP only WEIGHT: the rest is not noised
ROUND = "server-round"  # injected by Flower's strategies
USERS = "users"  # config: the sampled users this node trains in this round
SERIES = "run-series"  # config: 16 hex digits naming this run's saved device state (kept across resumptions)
CHECKPOINT_ROUND = "checkpoint-round"  # config: the server's last checkpoint; devices keep state back to it
RESUMED_FROM = "resumed-from"  # config, a resumed run: "<checkpoint round>-<session>"; devices drop later snapshots
SHARED_NAMES = "shared-arrays"  # config of a SecAgg+ round: names of the shared arrays, in the FitIns' order
ROUND_KEYS = (ROUND, USERS, SERIES, CHECKPOINT_ROUND, RESUMED_FROM, SHARED_NAMES)  # not settings

# Query (discovery) reply: which users a node hosts and the shapes of the model.
HELLO_METRICS = ("partition-id", "num-partitions", "first-user", "num-users", "population", "num-items",
                 "rating-min", "rating-max")

# Private per-node state in context.state (never sent).
STATE_KEY = "fedrec-users"

# Evaluate reply: metric sums over the node's users, finished into RMSE/HR@K by the server.
EVAL_SUMS = SUM_KEYS
EVAL_METRIC_PREFIXES = METRIC_PREFIXES  # what the server finishes them into
