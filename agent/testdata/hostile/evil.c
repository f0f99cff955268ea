/*
 * What a hostile pod plants for the agent's CRIU (test only). Built three ways by
 * TestPodFilesNeverReachAgentCRIU: as a library named in the container's /etc/ld.so.preload and
 * as a CRIU plugin in the container's /usr/lib/criu (its constructor runs on load), and as a
 * static program named as an action-script in the container's /etc/criu/default.conf. Whatever
 * runs it appends who it ran as to MARKER: the test fails if anything is there.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void record(const char *how)
{
	char status[4096] = "";
	int fd = open("/proc/self/status", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, status, sizeof(status) - 1);
		status[n > 0 ? n : 0] = 0;
		close(fd);
	}
	int out = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (out >= 0) {
		dprintf(out, "ran as %s in pid %d:\n%s\n", how, getpid(), status);
		close(out);
	}
}

#ifdef AS_LIBRARY
__attribute__((constructor)) static void on_load(void) { record("a preloaded library or plugin"); }
#else
int main(void)
{
	record("an action script");
	return 0;
}
#endif
