package certs

import (
	"context"
	"errors"
)

// Run is `stasis certs`. Placeholder until the deployment issue lands.
func Run(ctx context.Context, args []string) error { return errors.New("certs: not implemented yet") }
