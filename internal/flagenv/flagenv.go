// Package flagenv gives every command-line flag an environment-variable equivalent, so that a
// subcommand is configured the same way from a terminal and from a Pod spec.
//
// A flag --agent-port reads STASIS_AGENT_PORT when it is not given on the command line; the
// command line wins. Usage output lists the variable beside each flag.
package flagenv

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// EnvName is the variable that stands for a flag.
func EnvName(flagName string) string {
	return "STASIS_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Parse parses args into fs, then fills every flag not given on the command line from its
// environment variable. It also decorates fs's usage with the variable names.
func Parse(fs *flag.FlagSet, args []string) error {
	fs.VisitAll(func(f *flag.Flag) {
		f.Usage = fmt.Sprintf("%s [$%s]", f.Usage, EnvName(f.Name))
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(EnvName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("$%s: %w", EnvName(f.Name), e)
			}
		}
	})
	return err
}
