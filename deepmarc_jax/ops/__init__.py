"""Pure array ops (boxes, masks, ...), each tested against an independent reference."""
