"""Around the training core: W&B sweeps without a server (`sweep`), means with intervals over seeds (`statistics`),
and the few calls into W&B's and Lightning's logger internals (`wandb_run`)."""
