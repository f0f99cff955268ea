package criurun

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Bundle is the CRIU the agent runs: the folder hack/criu/install.sh fills (and the agent image
// ships at /usr/local/lib/stasis/criu). Every file in it belongs to the agent's image; nothing a
// pod can write is ever loaded, executed or parsed by the CRIU the agent starts:
//
//	criu          a wrapper script for people and tests (the agent does not use it)
//	root/         Debian's criu with its own dynamic loader and libraries
//	nsjoin.so     preloaded into CRIU: joins the target's namespaces after loading (nsjoin.c)
//	plugins/      empty: CRIU's plugin directory, instead of the container's /usr/lib/criu
type Bundle struct {
	Dir string
}

// Bundle paths relative to Bundle.Dir.
const (
	bundleLoader  = "root/usr/lib64/ld-linux-x86-64.so.2"
	bundleLibs    = "root/usr/lib/x86_64-linux-gnu"
	bundleLibs2   = "root/lib/x86_64-linux-gnu"
	bundleCriuBin = "root/usr/sbin/criu"
	bundleNsJoin  = "nsjoin.so"
	bundlePlugins = "plugins"
)

// ErrNoBundle is returned for a folder that is not a complete CRIU bundle.
var ErrNoBundle = errors.New("not a Stasis CRIU bundle (run hack/criu/install.sh, or use the agent image)")

// BundleOf returns the bundle holding the wrapper path criuPath (…/criu).
func BundleOf(criuPath string) (Bundle, error) {
	b := Bundle{Dir: filepath.Dir(criuPath)}
	for _, f := range []string{bundleLoader, bundleCriuBin, bundleNsJoin, bundlePlugins} {
		if _, err := os.Stat(filepath.Join(b.Dir, f)); err != nil {
			return b, fmt.Errorf("%s: %w: %v", b.Dir, ErrNoBundle, err)
		}
	}
	return b, nil
}

// argv starts CRIU through the bundle's own loader: the libraries come from the bundle, whatever
// the libc of the host or image, and nsjoin.so is preloaded. CRIU's own options come after.
// --no-default-config: CRIU would otherwise parse /etc/criu/default.conf and ~/.criu/default.conf
// after joining the container's mount namespace, i.e. files the pod writes (an action-script
// there runs as root). --libdir: likewise for the plugins CRIU dlopen()s. --file-validation
// filesize: no ELF parsing of the container's binaries.
func (b Bundle) argv(pluginsFD int, args ...string) []string {
	return append([]string{
		filepath.Join(b.Dir, bundleLoader),
		"--preload", filepath.Join(b.Dir, bundleNsJoin),
		"--library-path", filepath.Join(b.Dir, bundleLibs) + ":" + filepath.Join(b.Dir, bundleLibs2),
		filepath.Join(b.Dir, bundleCriuBin),
		"--no-default-config", "--libdir", fdPath(pluginsFD),
		// CRIU's default validation of the files a process maps reads their ELF build-id: it
		// would parse the container's binaries (files the pod writes) as root. Their size is
		// checked instead, at dump and restore alike.
		"--file-validation", "filesize",
	}, args...)
}

// fdPath names an fd CRIU inherited, as CRIU sees it from inside the container's namespaces.
func fdPath(fd int) string { return fmt.Sprintf("/proc/self/fd/%d", fd) }
