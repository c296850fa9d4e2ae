"""Which training round a message asks for, given to the site that answers it: supervised (FedPav and
FedReID's options, FedKLPR, RAF, FedDG; clients/supervised.py) or unsupervised (FedUReID;
clients/unsupervised.py). Kept apart from clients/site.py so that the rounds use the site and the
site knows nothing of the rounds."""

from __future__ import annotations

from flwr.app import RecordDict

from clients.site import Site
from clients.supervised import train_supervised
from clients.unsupervised import train_unsupervised


def train(site: Site, content: RecordDict, state: RecordDict) -> RecordDict:
    """Load the global SHARED arrays and this site's head, train locally, reply with the SHARED
    arrays; ``state`` keeps what the site keeps (and the state file mirrors it)."""
    spec, data = site.round_inputs(content, state)
    if spec.unsupervised.enabled:
        return train_unsupervised(site, content, state, spec, data)
    return train_supervised(site, content, state, spec, data)
