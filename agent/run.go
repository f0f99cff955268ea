package agent

import (
	"context"
	"errors"
)

// Run is `stasis agent`. Placeholder until the agent issue lands.
func Run(ctx context.Context, args []string) error { return errors.New("agent: not implemented yet") }
