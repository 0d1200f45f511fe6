"""The SecAgg+ wire format, shared by client and server: what a device masks.

A device's masked vector is its dense item-side update in this order, plus the number of
users it trained times C (so that the count shares the update's quantization range and
is only ever seen summed).
"""

from fedrec.models.mf import GLOBAL_BIAS, ITEM_BIAS, ITEM_EMB

COUNT = "user-count"
SECURE_ORDER = (ITEM_EMB, ITEM_BIAS, GLOBAL_BIAS, COUNT)
