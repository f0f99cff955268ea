package agent

import (
	"fmt"
	"os"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// SysV IPC across a checkpoint.
//
// SysV shared memory, semaphores and message queues live in the pod's IPC namespace, not in the
// processes: a process only holds an attachment (shared memory) or an id. CRIU dumps an IPC
// namespace only when the tree's differs from CRIU's own, and the agent's CRIU normally joins the
// container's. Measured with CRIU 4.2.1 (TestSysVSharedMemoryContinues): a tree attached to a SysV
// segment then fails the dump ("Task N with SysVIPC shmem map @… doesn't live in IPC ns"), and
// semaphores or message queues would silently be missing after a restore (semop: EINVAL). CRIU has
// no option to dump single objects.
//
// So when the pod's IPC namespace holds any SysV object, the dump leaves CRIU outside it
// (criurun.Join.DumpIPC): CRIU then dumps the whole namespace (every object with its contents,
// keys, ids, owners and modes, and the namespace's kernel.shm*/msg*/sem* limits), and the restore
// creates a private IPC namespace for the tree holding the same objects under the same ids. That
// is what PostgreSQL needs (its postmaster and every backend keep a small SysV segment attached).
// The restored tree no longer shares its IPC namespace with the pod's other containers: SysV
// objects shared between containers do not survive a checkpoint either way.

// ipcObjects counts the SysV objects of an IPC namespace.
type ipcObjects struct{ shm, sem, msg int }

func (o ipcObjects) any() bool { return o.shm+o.sem+o.msg > 0 }

func (o ipcObjects) String() string {
	return fmt.Sprintf("%d shared memory segment(s), %d semaphore set(s), %d message queue(s)", o.shm, o.sem, o.msg)
}

// sysvObjects reads /proc/sysvipc/{shm,sem,msg} from inside the IPC namespace of pid (those
// files show the reader's namespace). The reading thread enters it and ends with it: it is never
// given back to the Go runtime in another namespace.
func sysvObjects(pid int) (ipcObjects, error) {
	type result struct {
		o   ipcObjects
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/ipc", pid))
		if err != nil {
			ch <- result{err: fmt.Errorf("the pod's IPC namespace: %w", err)}
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWIPC); err != nil {
			ch <- result{err: fmt.Errorf("entering the pod's IPC namespace: %w", err)}
			return
		}
		var o ipcObjects
		for _, f := range []struct {
			name string
			n    *int
		}{{"shm", &o.shm}, {"sem", &o.sem}, {"msg", &o.msg}} {
			b, err := os.ReadFile("/proc/sysvipc/" + f.name)
			if err != nil {
				ch <- result{err: err}
				return
			}
			*f.n = countObjects(string(b))
		}
		ch <- result{o: o}
	}()
	r := <-ch
	return r.o, r.err
}

// countObjects counts the lines of a /proc/sysvipc table below its header.
func countObjects(table string) int {
	n := 0
	for i, l := range strings.Split(table, "\n") {
		if i > 0 && strings.TrimSpace(l) != "" {
			n++
		}
	}
	return n
}
