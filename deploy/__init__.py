"""Running fedrec on Flower's Deployment Engine: certificates and keys, a SuperLink and SuperNodes on this
machine or on loopback for tests."""
