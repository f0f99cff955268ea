package launcher

import (
	"context"
	"errors"
)

// Run is `stasis launcher`. Placeholder until the agent issue lands.
func Run(ctx context.Context, args []string) error {
	return errors.New("launcher: not implemented yet")
}
